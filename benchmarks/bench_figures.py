"""What drawing the main job's figures costs: every figure of a finished ``reproduce`` run drawn again from its saved
data, with attnlab's one-draw tight save (``figures.style.save``: one draw cropped to the tight box) and with
matplotlib's tight save (``savefig(bbox_inches="tight")``: a draw to measure the box, then the draw it writes),
alternating in this one process. Prints the CPU seconds of each round, the figures' draws, and the ratio.

    python -m attnlab.experiments.cli reproduce --quick --out /tmp/quick     # any finished run tree
    python benchmarks/bench_figures.py /tmp/quick [--rounds 3]
"""

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="the --out folder of a finished `attnlab reproduce`")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot  # noqa: F401  (imported before timing)
    from matplotlib.figure import Figure

    import attnlab.figures.style as style
    from attnlab.core.runs import draw, get_experiment

    runs = []
    for folder in sorted((Path(args.run) / "runs").iterdir()):
        meta = json.loads((folder / "meta.json").read_text())
        plot = get_experiment(meta["experiment"]).plot
        if plot and meta.get("figures"):
            runs.append((folder, meta, plot))
    if not runs:
        raise SystemExit(f"{args.run} holds no finished runs with figures; run `attnlab reproduce --out DIR` first")

    draws = [0]
    figure_draw = Figure.draw

    def counted(self, *a, **k):
        draws[0] += 1
        return figure_draw(self, *a, **k)

    Figure.draw = counted
    croppable = style._croppable

    def one_round(one_draw: bool) -> tuple[float, int]:
        style._croppable = croppable if one_draw else (lambda fig: False)
        draws[0], seconds = 0, 0.0
        with tempfile.TemporaryDirectory() as tmp:
            for folder, meta, plot in runs:
                out = Path(tmp) / folder.name
                out.mkdir()
                for name in meta.get("data", []):
                    shutil.copyfile(folder / name, out / name)
                t0 = time.process_time()
                draw(plot, out, meta)
                seconds += time.process_time() - t0
        return seconds, draws[0]

    one_round(True)  # warm: fonts, caches
    totals = {True: 0.0, False: 0.0}
    for r in range(args.rounds):
        for one_draw in (False, True):
            seconds, n = one_round(one_draw)
            totals[one_draw] += seconds
            print(f"round {r + 1}: {'one-draw save' if one_draw else 'matplotlib tight save':22s} {seconds:6.2f} s CPU,"
                  f" {n} draws")
    print(f"{len(runs)} runs; one-draw / tight save CPU: {totals[True] / totals[False]:.3f}")


if __name__ == "__main__":
    main()
