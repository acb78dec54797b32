"""Renders a results JSON as the Markdown tables the README quotes, so every number there comes from a file.

    python -m effikern.benchmarks.report benchmarks/results/<device>.json
"""

import json
import sys


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def render(data) -> str:
    v = data["versions"]
    lines = [
        f"Measured on **{data['device']}**, {data['date']}, git `{data['git_sha'][:12]}`, torch {v['torch']}, "
        f"triton {v['triton']}, {data['mode']} run; copy bandwidth {data['copy_bandwidth_gbps']:.1f} GB/s.",
        "",
        "| family | dtype | layout | mode | group | backend | geomean speedup | cases | slower than baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in data["summary"]:  # (files written before summaries had groups have no "group")
        lines.append(f"| {s['family']} | {s['dtype']} | {s['layout']} | {s['mode']} | {s.get('group') or '-'} | "
                     f"{s['backend']} | {_fmt(s['geomean_speedup'], '.2f')}x | {s['cases']} | {s['slower_cases']} |")
    lines += ["", "| op | shape | dtype | layout | mode | baseline ms | backend | ms | speedup | % copy BW |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["op"], r["shape"], r["dtype"], r["layout"], r["mode"]): r["ms"]
            for r in data["rows"] if r["backend"] == r["baseline"]}
    for r in data["rows"]:
        if r["backend"] == r["baseline"]:
            continue
        key = (r["op"], r["shape"], r["dtype"], r["layout"], r["mode"])
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['layout']} | {r['mode']} | "
                     f"{_fmt(base.get(key), '.3f')} | {r['backend']} | {_fmt(r['ms'], '.3f')} | "
                     f"{_fmt(r['speedup'], '.2f')}x | {_fmt(r['pct_copy_bw'], '.1f')} |")
    for family, report in data.get("reports", {}).items():
        lines += ["", f"{family}:", "", "| " + " | ".join(report[0]) + " |", "|" + "---|" * len(report[0])]
        lines += ["| " + " | ".join(_fmt(x, ".4g") if isinstance(x, float) else str(x) for x in row.values()) + " |"
                  for row in report]
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            print(render(json.load(f)))
