"""How many of this process's threads gloo started (run by the torchrun tests' processes)."""
import os


def gloo_threads() -> int:
    """Threads whose name says gloo, counted in Linux's /proc; -1 where there is none."""
    if not os.path.isdir("/proc/self/task"):
        return -1
    return sum("gloo" in open(f"/proc/self/task/{t}/comm").read()
               for t in os.listdir("/proc/self/task"))
