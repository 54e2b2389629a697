"""T5 on GLUE, BASELINE vs Majority Kernels (the paper's section 5.3, Tables 3-4, appendix C).

    python mkopt/recipes/t5_glue.py --config mkopt/recipes/configs/t5_glue/baseline.yaml
    python mkopt/recipes/t5_glue.py --config mkopt/recipes/configs/t5_glue/mk.yaml seed=1 tasks=[rte,mrpc]
    python mkopt/recipes/t5_glue.py --report runs/t5_glue        # table + curves of everything run so far

Each config line can be overridden as key=value (see GlueRunConfig in
mkopt/experiments/glue_finetune.py for every key). After a run the script writes
<out_dir>/table4.md and <out_dir>/curves.png over all methods and seeds found in out_dir, so
running baseline.yaml then mk.yaml gives the comparison. Offline smoke run (random tiny T5,
generated examples; a minute or two per method on 2 cores, mostly imports and start-up):

    python mkopt/recipes/t5_glue.py --config mkopt/recipes/configs/t5_glue/mk.yaml model=tiny-random data=generated \
        max_steps=20 eval_every=10 generated_examples=32 batch_size=8 sampler_compile=false out_dir=runs/t5_glue_smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mkopt.experiments.glue_finetune import GlueRunConfig, run
from mkopt.experiments.glue_report import plot_curves, table4
from mkopt.config import load_config


def report(out_dir: str | Path, which: str = "best") -> str:
    """Write ``table4.md`` and ``curves.png`` into ``out_dir``; return the table."""
    table = table4(out_dir, which)
    (Path(out_dir) / "table4.md").write_text(table)
    plot_curves(out_dir)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file (mkopt/recipes/configs/t5_glue/*.yaml)")
    parser.add_argument("--report", metavar="OUT_DIR", help="only (re)write table4.md and curves.png for OUT_DIR")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args(argv)
    if args.report:
        if args.config or args.overrides:
            parser.error("--report takes only the output folder")
        print(report(args.report))
        return 0
    if not args.config and not args.overrides:
        parser.error("pass --config mkopt/recipes/configs/t5_glue/mk.yaml (and key=value overrides), or --report OUT_DIR")
    config = load_config(GlueRunConfig, args.config, args.overrides)
    run(config)
    print(report(config.out_dir, config.report))
    print(f"curves: {Path(config.out_dir) / 'curves.png'}")
    return 0


if __name__ == "__main__":
    from mkopt.errors import exit_on_user_error

    sys.exit(exit_on_user_error(main, "t5_glue.py"))
