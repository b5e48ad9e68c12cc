"""`kubellm serve` whose engine core raises inside a step for one marked request: the test hook for "an error
raised for one request inside a step fails that request, and the engine keeps serving the others" (no real
input can raise there any more: intake and EngineCore.add bound every value the step uses).

    python -m tests.support.faulty_serve serve MODEL_DIR [serve flags]

A request whose prompt (token ids) starts with FAULT_MARKER makes the step that first runs it raise."""

from __future__ import annotations

import sys

from kubellm.runtime.engine.core import EngineCore
from kubellm.settings import EngineConfig

FAULT_MARKER = [7, 7, 7, 7, 7, 7, 7, 7]


class InjectedFault(RuntimeError):
    pass


def faulty_core(config: EngineConfig) -> EngineCore:
    core = EngineCore(config)
    collect = core.runner.collect

    def collect_or_raise(launched):
        if any(seq.token_ids[: len(FAULT_MARKER)] == FAULT_MARKER for seq in launched.sampling):
            raise InjectedFault("injected for a test")
        return collect(launched)

    core.runner.collect = collect_or_raise
    return core


def main() -> int:
    from kubellm.cli import build_parser

    args = build_parser().parse_args(sys.argv[1:])
    return args.func(args, make_core=faulty_core)


if __name__ == "__main__":
    sys.exit(main())
