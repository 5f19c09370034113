"""What the sampler holds and how long its profiles take, on workloads built to make it grow.

    PYTHONPATH=. .venv/bin/python benchmarks/sampled_heap_bounds.py [--library DIR ...]

Each workload runs in a process of its own with the sampler started first; then a profile is
captured and built (`heap` and `debug=1`) while a ticker thread measures how long it waits for
the GIL (the longest gap between 1 ms sleeps: what a service's event loop would have waited).
Printed per workload: records, the sampler's own C memory, the process's RSS growth, the
profile's size, capture and build time, and the longest GIL hold.

`--library DIR` runs the same workloads against another build of asgi_pprof (a folder holding an
`asgi_pprof` package: the installed one of an older commit, say), side by side: "before" and
"after". Only the API both share is used: start(rate=...), capture(), stats(),
sampled_profile.build() and render_text().

Workloads (from the issue that bounded the sampler):
- random-64k, random-1m: one line allocating bytes of random sizes, nothing kept, rate 512 KiB
- threads: 8 threads allocating lists, dicts and bytes of random sizes, rate 4,096
- stacks: 100,000 distinct stacks (a call tree 17 levels deep), rate 1
- functions: 2,000 functions made with exec, called once and deleted, rate 1: how many live on
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent(
    """
    import gc, json, os, random, sys, threading, time, weakref
    from asgi_pprof import sampled_profile, sampling

    def rss():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def random_sizes(count, below):
        draw = random.Random(1).randrange
        for _ in range(count):
            bytes(draw(1, below))

    def threads(seconds):
        stop = threading.Event()
        def work(seed):
            draw, kept = random.Random(seed), []
            while not stop.is_set():
                kept.append(bytes(draw.randrange(1, 70000)))
                kept.append([None] * draw.randrange(1, 2000))
                kept.append({n: None for n in range(draw.randrange(1, 200))})
                if len(kept) > 300:
                    del kept[:150]
        workers = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for worker in workers:
            worker.start()
        time.sleep(seconds)
        stop.set()
        for worker in workers:
            worker.join()

    def leaf(number):
        return bytes(100 + number % 7)

    def stacks(count):
        source = ["def level_0(path):\\n    leaf(path)\\n"]
        for level in range(1, 18):
            source.append(f"def level_{level}(path):\\n    if path >> {level - 1} & 1:\\n"
                          f"        level_{level - 1}(path)\\n    else:\\n"
                          f"        level_{level - 1}(path)\\n")
        namespace = {"leaf": leaf}
        exec(compile("".join(source), "<branching>", "exec"), namespace)
        for path in range(count):
            namespace["level_17"](path)

    def functions(count):
        alive = weakref.WeakSet()
        for number in range(count):
            namespace = {}
            exec(f"def generated_{number}():\\n    return bytearray({1000 + number})\\n", namespace)
            namespace[f"generated_{number}"]()
            alive.add(namespace[f"generated_{number}"].__code__)
            del namespace
        gc.collect()
        return len(alive)

    def longest_hold(work):
        gaps, done = [0.0], threading.Event()
        def tick():
            last = time.perf_counter()
            while not done.is_set():
                time.sleep(0.001)
                now = time.perf_counter()
                gaps[0] = max(gaps[0], now - last - 0.001)
                last = now
        ticker = threading.Thread(target=tick)
        ticker.start()
        started = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - started
        done.set()
        ticker.join()
        return result, seconds, gaps[0]

    name, rate = sys.argv[1], int(sys.argv[2])
    before = rss()
    sampling.start(rate=rate)
    alive = None
    if name == "random-64k":
        random_sizes(300_000, 1 << 16)
    elif name == "random-1m":
        random_sizes(300_000, 1 << 20)
    elif name == "threads":
        threads(20)
    elif name == "stacks":
        stacks(100_000)
    elif name == "functions":
        alive = functions(2000)
    heap, capture_s, capture_hold = longest_hold(sampling.capture)
    profile, build_s, build_hold = longest_hold(lambda: sampled_profile.build(heap, "heap"))
    text, text_s, text_hold = longest_hold(lambda: sampled_profile.render_text(heap))
    stats = sampling.stats()
    print(json.dumps({
        "records": stats.get("records"), "own_bytes": stats.get("own_bytes"),
        "rss_growth": rss() - before, "profile_bytes": len(profile), "text_bytes": len(text),
        "capture_s": capture_s, "build_s": build_s, "text_s": text_s,
        "longest_hold_s": max(capture_hold, build_hold, text_hold), "functions_alive": alive,
    }))
    """
)
WORKLOADS = {  # name: rate
    "random-64k": 524288,
    "random-1m": 524288,
    "threads": 4096,
    "stacks": 1,
    "functions": 1,
}


def run(workload: str, library: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": library} if library else dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-c", WORKER, workload, str(WORKLOADS[workload])],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{workload} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--library", action="append", default=[], help="another asgi_pprof")
    parser.add_argument("--workload", action="append", choices=list(WORKLOADS))
    args = parser.parse_args()
    libraries = ["", *args.library]  # "": the installed one
    print(
        "| workload | library | records | own memory | RSS growth | profile | debug=1 text "
        "| capture | build heap | build text | longest GIL hold | functions alive |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for workload in args.workload or list(WORKLOADS):
        for library in libraries:
            r = run(workload, library)
            print(
                f"| {workload} | {library or 'installed'} | {r['records']:,} "
                f"| {r['own_bytes'] / 2**20:.2f} MiB | {r['rss_growth'] / 2**20:+.1f} MiB "
                f"| {r['profile_bytes'] / 1024:,.0f} KiB | {r['text_bytes'] / 1024:,.0f} KiB "
                f"| {r['capture_s'] * 1000:,.0f} ms | {r['build_s'] * 1000:,.0f} ms "
                f"| {r['text_s'] * 1000:,.0f} ms | {r['longest_hold_s'] * 1000:,.1f} ms "
                f"| {r['functions_alive'] if r['functions_alive'] is not None else '-'} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
