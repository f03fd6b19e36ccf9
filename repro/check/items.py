"""One line of `repro check`'s table: what was checked, what was found, and for a failure, the fix."""
from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass

OK, NOTE, FAIL = "ok", "note", "FAIL"  # a note informs (no GPU here, generated data) and fails nothing


@dataclass(frozen=True)
class Item:
    section: str  # software, devices, data, disk, slurm, training
    name: str
    status: str  # OK, NOTE or FAIL
    detail: str  # what was found
    fix: str = ""  # what to do; every failure has one

    def as_dict(self) -> dict:
        return asdict(self)


def ok(section: str, name: str, detail: str) -> Item:
    return Item(section, name, OK, detail)


def note(section: str, name: str, detail: str) -> Item:
    return Item(section, name, NOTE, detail)


def fail(section: str, name: str, detail: str, fix: str) -> Item:
    return Item(section, name, FAIL, detail, fix)


def format_table(items: list[Item], width: int = 110) -> str:
    """Section, item, status and detail in columns; long details wrap under their column and a
    failure's fix follows on its own line."""
    name_width = max([len(item.name) for item in items] + [4])
    lead = 9 + 1 + name_width + 1 + 6 + 1
    wrapper = textwrap.TextWrapper(width=max(width, lead + 40), subsequent_indent=" " * lead,
                                   break_long_words=False, break_on_hyphens=False)
    lines = [f"{'SECTION':9s} {'ITEM':{name_width}s} {'STATUS':6s} DETAIL"]
    for item in items:
        lines.append(wrapper.fill(f"{item.section:9s} {item.name:{name_width}s} {item.status:6s} {item.detail}"))
        if item.fix:
            lines.append(wrapper.fill(" " * lead + f"fix: {item.fix}"))
    return "\n".join(lines)
