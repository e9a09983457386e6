"""Text the commands answer with, in Markdown every platform renders (Slack's adapter converts it to mrkdwn)."""
from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from bot.personas import Persona

if TYPE_CHECKING:
    from bot.retrieval import Hit

PROMPT_SHOWN = 1500  # characters of a system prompt `/persona show` prints: one Discord message with the header
BAR_WIDTH = 24


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_persona(persona: Persona, *, origin: str, active: bool) -> str:
    model = persona.model.model_dump(exclude_none=True)
    lines = [
        f"**{persona.display_name}** (`{persona.name}`, {origin})" + (": active here" if active else ""),
        persona.description,
        f"Model: `{model}`" if model else "Model: the default",
        f"Knowledge: {', '.join(persona.knowledge)}" if persona.knowledge else "",
        f"Few-shot examples: {len(persona.examples)}" if persona.examples else "",
    ]
    prompt = clip(persona.system.replace("```", "`\u200b``"), PROMPT_SHOWN)
    return "\n".join(line for line in lines if line) + f"\n```\n{prompt}\n```"


def format_hits(hits: list["Hit"]) -> str:
    return "\n".join(f"**{hit.source}** § {hit.locator} ({hit.score:.2f})\n> {clip(' '.join(hit.text.split()), 300)}"
                     for hit in hits)


def usage_chart(rows: list[dict]) -> str:
    """Tokens a day as a bar chart (people would rather look than read), then the totals by persona."""
    by_day: dict[str, int] = defaultdict(int)
    by_persona: dict[str, int] = defaultdict(int)
    for row in rows:
        by_day[row["day"]] += row["total"]
        by_persona[row["persona"] or "-"] += row["total"]
    peak = max(by_day.values())
    days = [f"{day[5:]} {'█' * max(1, round(BAR_WIDTH * total / peak)):<{BAR_WIDTH}} {total:>9,}"
            for day, total in sorted(by_day.items())]
    personas = ", ".join(f"{name} {total:,}" for name, total in sorted(by_persona.items(), key=lambda p: -p[1]))
    return (f"Tokens by day (UTC), {sum(by_day.values()):,} in all:\n```\n" + "\n".join(days) + "\n```\n"
            f"By persona: {personas}")
