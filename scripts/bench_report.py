#!/usr/bin/env python3
"""Turn scripts/compare-peers.sh results (one JSON object per run) into a Markdown table of
medians with ratios against each peer, and a gnuplot chart of those ratios.

Input lines: {"test": T, "system": S, "rep": N, "rc": RC, "result": <socksgate-load JSON or null>}.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

# Figures we extract from each test's JSON: (key, label, unit format).
FIGURES = {
    "throughput": [("gbit_per_sec", "Gbit/s", "{:.2f}"), ("cpu_ns_per_kib", "CPU ns/KiB", "{:.0f}"),
                   ("cpu_pct", "proxy CPU %", "{:.0f}")],
    "connrate": [("ops_per_sec", "conn/s", "{:.0f}"), ("cpu_us_per_op", "CPU us/conn", "{:.1f}"),
                 ("p99_us", "p99 us", "{:.0f}"), ("cpu_pct", "proxy CPU %", "{:.0f}")],
    "latency": [("round_trips_per_sec", "round trips/s", "{:.0f}"), ("p50_us", "p50 us", "{:.0f}"),
                ("p99_us", "p99 us", "{:.0f}"), ("cpu_us_per_op", "CPU us/round trip", "{:.2f}"),
                ("cpu_pct", "proxy CPU %", "{:.0f}")],
    "idle": [("kib_per_tunnel", "KiB/tunnel", "{:.2f}"), ("established", "tunnels", "{:.0f}")],
    "udp": [("received_per_sec", "datagrams/s", "{:.0f}"), ("loss_pct", "loss %", "{:.3f}"),
            ("p99_us", "p99 us", "{:.0f}"), ("cpu_us_per_op", "CPU us/datagram", "{:.2f}"),
            ("cpu_pct", "proxy CPU %", "{:.0f}")],
    "http": [("requests_per_sec", "requests/s", "{:.0f}"), ("p99_us", "p99 us", "{:.0f}"),
             ("cpu_us_per_op", "CPU us/request", "{:.1f}"), ("cpu_pct", "proxy CPU %", "{:.0f}")],
}

# Short test names for the chart.
SHORT = {
    "tp-1-up": "throughput 1 up", "tp-1-down": "throughput 1 down", "tp-8-up": "throughput 8 up",
    "tp-8-down": "throughput 8 down", "connrate-noauth": "connrate no-auth",
    "connrate-auth": "connrate auth", "latency-50": "latency 50", "udp": "UDP", "http": "HTTP",
}

# Machine context recorded for every run (from /proc/stat around the run).
CONTEXT = [("cpu0_busy", "CPU0 busy %", "{:.0f}"), ("cpu0_other", "CPU0 other %", "{:.0f}"),
           ("cpu1_busy", "CPU1 busy %", "{:.0f}")]

TEST_TITLES = {
    "tp-1-up": "throughput, 1 stream up",
    "tp-1-down": "throughput, 1 stream down",
    "tp-8-up": "throughput, 8 streams up",
    "tp-8-down": "throughput, 8 streams down",
    "connrate-noauth": "connrate, no auth (c=50)",
    "connrate-auth": "connrate, RFC 1929 auth (c=50)",
    "latency-50": "latency, 50 tunnels",
    "idle": "idle tunnels",
    "udp": "UDP ASSOCIATE echo (window 64)",
    "http": "HTTP forwarding (c=50)",
    "threads-connrate": "connrate, unpinned",
    "threads-tp-8-up": "throughput 8 up, unpinned",
    "threads-tp-8-down": "throughput 8 down, unpinned",
}

# (test, figure key, ours, peer, goal, higher_is_better); goal is a ratio ours/peer, or None.
COMPARISONS = [
    *[(f"tp-{n}-{d}", "gbit_per_sec", "socksgate", peer, goal, True)
      for n in (1, 8) for d in ("up", "down") for peer, goal in (("dante", 1.7), ("direct", 0.7))],
    *[(f"tp-{n}-{d}", "cpu_ns_per_kib", "socksgate", "dante", None, False)
      for n in (1, 8) for d in ("up", "down")],
    ("connrate-noauth", "ops_per_sec", "socksgate", "microsocks", 1.5, True),
    ("connrate-noauth", "ops_per_sec", "socksgate", "haproxy", None, True),
    ("connrate-noauth", "cpu_us_per_op", "socksgate", "haproxy", 1.0, False),
    ("connrate-noauth", "cpu_us_per_op", "socksgate", "microsocks", None, False),
    ("connrate-auth", "ops_per_sec", "socksgate", "microsocks", 1.5, True),
    ("connrate-auth", "cpu_us_per_op", "socksgate", "microsocks", None, False),
    ("latency-50", "round_trips_per_sec", "socksgate", "haproxy", 0.95, True),
    ("latency-50", "p99_us", "socksgate", "haproxy", 1.0, False),
    ("latency-50", "cpu_us_per_op", "socksgate", "haproxy", None, False),
    ("idle", "kib_per_tunnel", "socksgate", "haproxy", None, False),
    ("idle", "kib_per_tunnel", "socksgate", "microsocks", None, False),
    ("udp", "received_per_sec", "socksgate", "dante", 2.0, True),
    ("udp", "received_per_sec", "socksgate", "direct", None, True),
    ("udp", "cpu_us_per_op", "socksgate", "dante", None, False),
    ("udp", "loss_pct", "socksgate", "dante", None, False),
    ("http", "requests_per_sec", "socksgate", "tinyproxy", 3.0, True),
    ("http", "requests_per_sec", "socksgate", "direct", None, True),
    ("http", "cpu_us_per_op", "socksgate", "tinyproxy", None, False),
    # Against an older build (`compare-peers.sh --baseline BIN`), where one was run.
    *[(t, k, "socksgate", "socksgate-baseline", None, hi)
      for t in ("tp-1-up", "tp-1-down", "tp-8-up", "tp-8-down")
      for k, hi in (("gbit_per_sec", True), ("cpu_ns_per_kib", False))],
    *[(t, k, "socksgate", "socksgate-baseline", None, hi)
      for t in ("connrate-noauth", "latency-50", "udp", "http")
      for k, hi in (("ops_per_sec", True), ("round_trips_per_sec", True), ("received_per_sec", True),
                    ("requests_per_sec", True), ("cpu_us_per_op", False))],
    ("threads-connrate", "ops_per_sec", "socksgate-t2", "socksgate-t1", None, True),
    ("threads-tp-8-up", "gbit_per_sec", "socksgate-t2", "socksgate-t1", None, True),
    ("threads-tp-8-down", "gbit_per_sec", "socksgate-t2", "socksgate-t1", None, True),
]

# Absolute goals: (test, key, system, limit, text).
ABSOLUTE = [("idle", "kib_per_tunnel", "socksgate", 1.0, "< 1 KiB/tunnel")]


def derive(res):
    """Add per-operation CPU figures computed from cpu_seconds."""
    cpu = res.get("cpu_seconds")
    mode = res.get("mode")
    if cpu is None:
        return res
    if res.get("elapsed"):
        res["cpu_pct"] = cpu / res["elapsed"] * 100
    ops = {"connrate": res.get("ops"), "latency": res.get("round_trips"),
           "udp": res.get("received"), "http": res.get("requests")}.get(mode)
    if ops:
        res["cpu_us_per_op"] = cpu / ops * 1e6
    if mode == "throughput" and res.get("bytes"):
        res["cpu_ns_per_kib"] = cpu / (res["bytes"] / 1024) * 1e9
    return res


def load(path):
    runs = {}
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        r = json.loads(line)
        runs.setdefault((r["test"], r["system"]), []).append(r)
    return runs


def medians(runs):
    """(test, system) -> {key: median over successful runs}, plus run counts."""
    out = {}
    for (test, system), rs in runs.items():
        ok = []
        for r in rs:
            if r["result"] and r["rc"] == 0:
                res = derive(r["result"])
                busy = r.get("busy") or [None, None]
                res["cpu0_busy"], res["cpu1_busy"] = busy
                if busy[0] is not None and res.get("cpu_pct") is not None:
                    res["cpu0_other"] = max(0.0, busy[0] - res["cpu_pct"])
                ok.append(res)
        bad = len(rs) - len(ok)
        mode = (ok[0]["mode"] if ok else None)
        vals = {}
        if mode:
            for key, _, _ in FIGURES[mode] + CONTEXT:
                xs = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
                if xs:
                    vals[key] = statistics.median(xs)
        out[(test, system)] = {"mode": mode, "vals": vals, "ok": len(ok), "runs": len(rs),
                               "retried": sum(1 for r in rs if r.get("attempts", 1) > 1),
                               "bad": bad,
                               "errors": sum(r["result"].get("errors", 0) for r in rs if r["result"])}
    return out


def fmt_of(key, mode=None):
    """Label and number format of a figure, preferring the test's own mode."""
    for m, figs in ([(mode, FIGURES[mode])] if mode in FIGURES else []) + list(FIGURES.items()):
        for k, label, f in figs:
            if k == key:
                return label, f
    return key, "{:.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--meta", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--elapsed", type=int, default=None, help="default: from the meta file")
    ap.add_argument("--loadavg-end", default=None, help="default: from the meta file")
    a = ap.parse_args()
    meta = json.load(open(a.meta))
    if a.elapsed is None:
        a.elapsed = int(meta.get("elapsed", 0))
    if a.loadavg_end is None:
        a.loadavg_end = meta.get("loadavg_end", "?")
    runs = load(a.results)
    med = medians(runs)

    lines = []
    title = "socksgate vs peers" + (" (quick run)" if meta.get("quick") else "")
    lines.append(f"# {title}\n")
    lines.append(
        f"Generated by `scripts/compare-peers.sh{' --quick' if meta.get('quick') else ''}` on "
        f"{meta['date']} at commit `{meta['commit']}`, {a.elapsed // 60} min {a.elapsed % 60} s. "
        f"Machine: {meta['cores']} cores ({meta['cpu']}), kernel {meta['kernel']}, shared and noisy "
        f"(load average {meta.get('loadavg_start', '?')} at the start, {a.loadavg_end} at the end: other "
        f"sessions' builds and tests run beside the benchmark, on both cores); loopback only.\n")
    lines.append(
        f"Method: each proxy pinned to CPU 0 (`taskset -c 0`, socksgate `--threads 1`), the load "
        f"generator and its targets pinned to CPU 1; {meta['seconds']} s measured after "
        f"{meta['warmup']} s warmup; every figure is the **median of {meta['reps']} runs**, "
        f"interleaved across proxies. CPU per operation is the proxy process's utime+stime over the "
        f"measured window (`socksgate-load --cpu-pid`; for dante the whole process tree), divided by the operations completed in it: unlike the rates, it hardly depends on how much CPU the proxy got. "
        f"haproxy ({meta['versions']['haproxy']}, `mode tcp`, `nbthread 1`) forwards to the same "
        f"standalone target (`socksgate-load target`) with no handshake at all: the floor for the "
        f"cost of a relayed connection. `proxy CPU %` is that CPU time over the window: well under "
        f"100 means the proxy did not saturate its core (waiting on the client side, or losing CPU 0 to "
        f"other processes). `CPU0 busy %` / `CPU1 busy %` are the whole cores' utilisation during the "
        f"run (/proc/stat) and `CPU0 other %` = CPU0 busy - proxy CPU %: the share of the proxy's core "
        f"that went to anything else (kernel softirq work for the proxy's sockets included, and, on this "
        f"shared machine, other sessions' builds). "
        f"A run during which more than {meta.get('max_other', 25)} % of CPU 0 went to other work was "
        f"repeated, up to {meta.get('tries', 1)} tries, and the last try kept (`retried` below). "
        f"{'All proxies, the load generator and the targets ran under `nice -n ' + str(meta['nice']) + '`. ' if meta.get('nice') else ''}"
        f"connrate ran on the load generator's {'blocking engine (a thread per connection)' if meta.get('connrate_engine', 'blocking') == 'blocking' else 'event engine (nonblocking sockets in one mio loop)'}. "
        f"Peers: {meta['versions']['dante']}, microsocks "
        f"{meta['versions']['microsocks']}, {meta['versions']['tinyproxy']}."
        f"{' Baseline (`socksgate-baseline`): `' + meta['baseline'] + '`, run the same way, interleaved with socksgate.' if meta.get('baseline') else ''}\n")
    idle = ("KiB per tunnel = the RSS growth from half the tunnels open to all of them, divided by the "
            "second half's count, in a freshly started proxy (so what a proxy allocates once is not charged "
            "to its tunnels).")
    if meta["idle_conns"] != meta["idle_requested"]:
        lines.append(
            f"Idle: {meta['idle_conns']} tunnels instead of {meta['idle_requested']}: RLIMIT_NOFILE's "
            f"hard limit here is {meta['nofile']} and cannot be raised without CAP_SYS_RESOURCE, and a "
            f"proxy needs two descriptors per tunnel. {idle}\n")
    else:
        lines.append(f"Idle: {idle}\n")

    limit = meta.get("max_other", 35)
    contended = sorted(f"{TEST_TITLES.get(t, t)} / {sy} ({m['vals']['cpu0_other']:.0f} %)"
                       for (t, sy), m in med.items()
                       if m["vals"].get("cpu0_other", 0) > limit)
    if contended:
        lines.append(
            f"**Warning: other processes took more than {limit} % of CPU 0 (median) during these "
            f"measurements even after retries; their rates mostly measure the machine's load, "
            f"trust their CPU-per-operation figures instead:** {'; '.join(contended)}.\n")
    lines.append("## Ratios against each peer (medians)\n")
    lines.append("| test | figure | socksgate | peer | peer value | socksgate / peer | goal | met |")
    lines.append("|---|---|---:|---|---:|---:|---|---|")
    chart = []
    for test, key, ours, peer, goal, higher in COMPARISONS:
        mo, mp = med.get((test, ours)), med.get((test, peer))
        if not mo or not mp:
            continue
        if peer == "socksgate-baseline" and key not in mo["vals"]:
            continue
        label, f = fmt_of(key, mo["mode"])
        vo, vp = mo["vals"].get(key), mp["vals"].get(key)
        so = "n/a" if vo is None else f.format(vo)
        sp = "n/a" if vp is None else f.format(vp)
        ratio = vo / vp if vo is not None and vp else None
        rs = "n/a" if ratio is None else f"{ratio:.2f}x"
        if goal is None:
            gs, met = "(info)", ""
        else:
            gs = (">= " if higher else "<= ") + f"{goal:g}x"
            met = "n/a" if ratio is None else ("yes" if (ratio >= goal if higher else ratio <= goal) else "**no**")
        name = ours if ours != "socksgate" else "socksgate"
        who = f" ({ours})" if ours != "socksgate" else ""
        lines.append(f"| {TEST_TITLES.get(test, test)}{who} | {label} | {so} | {peer} | {sp} | {rs} | {gs} | {met} |")
        if ratio is not None and goal is not None:
            better = ratio if higher else 1 / ratio if ratio else 0
            goal_better = goal if higher else 1 / goal
            chart.append((f"{SHORT.get(test, test)} {label} vs {peer}", better, goal_better))
        del name
    for test, key, system, limit, text in ABSOLUTE:
        m = med.get((test, system))
        if not m or key not in m["vals"]:
            continue
        label, f = fmt_of(key)
        v = m["vals"][key]
        lines.append(f"| {TEST_TITLES[test]} ({meta['idle_conns']}) | {label} | {f.format(v)} | (absolute) | | | {text} | "
                     f"{'yes' if v < limit else '**no**'} |")
        chart.append((f"idle KiB/tunnel vs 1 KiB goal", limit / v if v > 0 else 0, 1.0))
    lines.append("")
    lines.append("Lower is better for CPU, p99 and KiB figures (their goal is `<=`); higher is better for "
                 "the rest. `threads` rows are unpinned: socksgate, the load generator and the targets "
                 "share both cores, so `--threads 2` competes with the load generator for CPU.\n")

    lines.append("## All medians\n")
    lines.append("| test | system | runs ok | figures |")
    lines.append("|---|---|---:|---|")
    order = list(TEST_TITLES)
    for (test, system), m in sorted(med.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 99, kv[0][1])):
        figs = []
        if m["mode"]:
            for key, label, f in FIGURES[m["mode"]] + CONTEXT:
                if key in m["vals"]:
                    figs.append(f"{label} {f.format(m['vals'][key])}")
        if m["errors"]:
            figs.append(f"errors {m['errors']}")
        retried = f" ({m['retried']} retried)" if m["retried"] else ""
        lines.append(f"| {TEST_TITLES.get(test, test)} | {system} | {m['ok']}/{m['runs']}{retried} | "
                     f"{'; '.join(figs) or 'failed'} |")
    lines.append("")
    lines.append(f"Raw JSON lines: `{os.path.basename(a.out)}.jsonl`. Chart: `{os.path.basename(a.out)}.svg` (and `.png`).\n")
    with open(a.out + ".md", "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))

    if chart and shutil.which("gnuplot"):
        dat = a.out + ".chart.dat"
        with open(dat, "w") as fh:
            for name, v, g in chart:
                fh.write(f'"{name}" {v:.4f} {g:.4f}\n')
        height = 260 + 24 * len(chart)
        body = f"""
set title 'socksgate vs peers: median ratio, normalised so higher is better (bar); goal (diamond)'
set style fill solid 0.7 border -1
set yrange [-0.5:{len(chart) - 0.5}] reverse
set xrange [0:*]
set ytics nomirror
set xlabel 'ratio (socksgate / peer; peer / socksgate for CPU, p99 and memory)'
set grid xtics
set key below
set arrow from 1, graph 0 to 1, graph 1 nohead dt 2 lc rgb '#555555'
plot '{dat}' using ($2/2):0:($2/2):(0.35):yticlabels(1) with boxxyerror lc rgb '#3b7dd8' title 'socksgate', \\
     '' using 3:0 with points pt 13 ps 1.3 lc rgb '#d83b3b' title 'goal'
"""
        for term, ext in ((f"svg size 1100,{height} dynamic font 'sans,11' background '#ffffff'", "svg"),
                          (f"pngcairo size 1100,{height} font 'sans,10' background '#ffffff'", "png")):
            gp = f"set terminal {term}\nset output '{a.out}.{ext}'\n{body}"
            try:
                subprocess.run(["gnuplot"], input=gp, text=True, check=True, capture_output=True)
            except subprocess.CalledProcessError as e:
                print("gnuplot failed:", e.stderr, file=sys.stderr)
        os.remove(dat)
    elif chart:
        print("gnuplot not found: no chart", file=sys.stderr)


if __name__ == "__main__":
    main()
