"""Peak-memory helpers shared by the benchmarks (Linux /proc; each measurement in a fresh process)."""

import os
import resource


def rss_now() -> int:
    """Resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_parts() -> dict:
    """Resident memory split by kind, in bytes: ``anon`` (heap, mmapped tensors, Python objects)
    and ``file`` (pages of mapped files: mostly the code of torch's shared libraries). Empty
    where /proc/self/status lacks the fields (Linux < 4.5)."""
    keys = {"RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(None, 1)[0]
            if key in keys:
                out[keys[key]] = int(line.split()[1]) * 1024
    return out


def reset_peak() -> None:
    """Reset the kernel's high-water mark (VmHWM) so setup temporaries do not count (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then VmHWM still includes setup; the figure is an upper bound


def peak() -> int:
    """Peak resident set size in bytes since the last :func:`reset_peak` (or process start)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
