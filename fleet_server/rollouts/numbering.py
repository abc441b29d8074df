"""One stage numbering for people: stages count from 1 everywhere they are shown.

The engine keeps a 0-based stage index (``RolloutState.stage``, -1 while pending) and its
decision reasons say ``stage 0 -> 1``; the CLI, the API's ``stage_number``, the report
and the dashboard show stage 1 for the first stage. This module converts the engine's
texts.
"""

from __future__ import annotations

import re


def people_stages(text: str) -> str:
    """Engine reasons count stages from 0; show them from 1 like everything else."""
    text = re.sub(
        r"stage (\d+) -> (\d+)",
        lambda m: f"stage {int(m[1]) + 1} -> {int(m[2]) + 1}",
        text,
    )
    return re.sub(r"\bstage (\d+)(?! ->)\b", lambda m: f"stage {int(m[1]) + 1}", text)
