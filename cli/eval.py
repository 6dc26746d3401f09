"""`xlaserve eval ...`: lm-evaluation-harness's own command line with the xlaserve backends
registered; everything after `eval` goes to lm_eval's parser."""

from __future__ import annotations

import sys


def cmd_eval(lm_eval_args: list[str]) -> int:
    """Everything after `eval` goes to lm_eval's own parser."""
    try:
        from xlaserve.evals import lm_eval_backend
    except ImportError as e:
        print(
            f"xlaserve: error: `xlaserve eval` needs lm-evaluation-harness: pip install 'xlaserve[eval]' "
            f"({e})",
            file=sys.stderr,
        )
        return 2
    lm_eval_backend.main(lm_eval_args)
    return 0


def register(sub) -> None:
    """Listed in `xlaserve --help` only: main() hands `eval` to cmd_eval before argparse sees it."""
    sub.add_parser(
        "eval",
        help="lm-evaluation-harness's command line with the xlaserve backends registered "
        "(xlaserve eval --model xlaserve --model_args model=smollm2 --tasks ...)",
    )
