"""Peak resident memory of this process over a block, sampled every 5 ms (for the benchmarks)."""

from __future__ import annotations

import threading
import time

import psutil


class PeakRSS:
    """Context manager: ``rest`` is the RSS on entry and ``peak`` the largest seen, in bytes."""

    def __enter__(self) -> PeakRSS:
        self._process = psutil.Process()
        self.rest = self.peak = self._process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)
