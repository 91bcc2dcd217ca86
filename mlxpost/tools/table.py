"""Text tables that fit a terminal: measured, shrunk where allowed, turned on their side when too wide.

``compare`` and ``runs`` print tables whose width depends on the runs (how
many, how many settings differ, how long their paths are). A table that is
wider than the terminal is unreadable (wrapped lines) or loses its right end,
where the numbers that matter often are. :func:`fit` decides, for a width:

1. the table as it is, when it fits;
2. else with its shrinkable columns (paths, long setting values) cut in the
   middle (``/home/me/…/run-3``), never below :data:`MIN_SHRUNK` characters;
3. else (``transpose=True``) turned on its side, one row per column and one
   column per row (a run per column), in several tables when the rows do not
   fit side by side, each repeating the first column.

Cells never shrink unless their column is marked shrinkable, so a number
is never cut. Plain text joins columns with :data:`GAP` spaces; the Rich
renderer in ``cli/`` draws the same blocks with the same widths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GAP = 2  # spaces between columns

MIN_SHRUNK = 12  # a shrunk cell keeps at least this many characters

ELLIPSIS = "…"


def shorten(text: str, width: int) -> str:
    """``text`` cut in the middle to ``width`` characters (the ends carry the most: a path's root and name).

    >>> shorten("/home/me/runs/sweep-1/lr-0.001", 20)
    '/home/me/…1/lr-0.001'
    >>> shorten("short", 20)
    'short'
    """
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    head = (width - 1) // 2
    tail = width - 1 - head
    return text[:head] + ELLIPSIS + (text[-tail:] if tail else "")


@dataclass
class Block:
    """One table: a header row, rows of text cells, alignment per column.

    ``align``: ``"l"`` or ``"r"`` per column. ``shrink``: columns that may be
    cut to fit. ``marked``: (row, column) cells to highlight (the best value).
    """

    header: list[str]
    rows: list[list[str]]
    align: list[str]
    title: str | None = None
    shrink: set[int] = field(default_factory=set)
    marked: set[tuple[int, int]] = field(default_factory=set)

    def widths(self) -> list[int]:
        return [max(len(r[i]) for r in [self.header] + self.rows) for i in range(len(self.header))]

    def width(self) -> int:
        w = self.widths()
        return sum(w) + GAP * (len(w) - 1)

    def lines(self) -> list[str]:
        """The block as plain text: title, header, a rule, rows.

        >>> b = Block(["run", "loss"], [["a", "1.5"], ["bb", "0.25"]], ["l", "r"], title="metrics")
        >>> print("\\n".join(b.lines()))
        metrics
        run  loss
        ---  ----
        a     1.5
        bb   0.25
        """
        widths = self.widths()

        def line(cells: list[str]) -> str:
            return (" " * GAP).join(c.rjust(w) if a == "r" else c.ljust(w)
                                    for c, w, a in zip(cells, widths, self.align)).rstrip()

        out = [self.title] if self.title else []
        out += [line(self.header), (" " * GAP).join("-" * w for w in widths)]
        return out + [line(r) for r in self.rows]


def _shrunk(block: Block, width: int) -> Block | None:
    """The block with its shrinkable columns cut (widest first) until it fits ``width``; None if it cannot."""
    widths = block.widths()
    excess = block.width() - width
    if excess <= 0:
        return block
    room = {i: widths[i] - max(MIN_SHRUNK, len(block.header[i])) for i in block.shrink}
    if sum(max(r, 0) for r in room.values()) < excess:
        return None
    limit = dict(enumerate(widths))
    while excess > 0:  # take one character at a time from the widest shrinkable column
        i = max((i for i in room if room[i] > 0), key=lambda i: limit[i])
        limit[i] -= 1
        room[i] -= 1
        excess -= 1
    rows = [[shorten(c, limit[i]) if i in block.shrink else c for i, c in enumerate(r)] for r in block.rows]
    return Block(block.header, rows, block.align, block.title, block.shrink, block.marked)


def transpose(block: Block, first: str | None = None) -> Block:
    """One row per column of ``block`` (after its first), one column per row; the first column's cells
    become the header. Shrinkable columns become shrinkable rows: their cells are cut here to at most
    :data:`MIN_SHRUNK` * 2 characters, since a row cannot shrink on its own.

    >>> b = Block(["run", "loss", "lr"], [["a", "1.5", "1e-4"], ["b", "0.25", "3e-4"]], ["l", "r", "l"])
    >>> print("\\n".join(transpose(b).lines()))
    run      a     b
    ----  ----  ----
    loss   1.5  0.25
    lr    1e-4  3e-4
    """
    header = [first or block.header[0]] + [r[0] for r in block.rows]
    rows, marked = [], set()
    for j in range(1, len(block.header)):
        cut = j in block.shrink
        rows.append([block.header[j]] + [shorten(r[j], MIN_SHRUNK * 2) if cut else r[j] for r in block.rows])
        marked |= {(j - 1, i + 1) for i in range(len(block.rows)) if (i, j) in block.marked}
    align = ["l"] + ["r" if any(block.align[j] == "r" for j in range(1, len(block.header))) else "l"] * len(block.rows)
    return Block(header, rows, align, block.title, set(), marked)


def split_columns(block: Block, width: int) -> list[Block]:
    """The block cut into several, each with the first column and as many of the others as fit ``width``
    (at least one each)."""
    widths = block.widths()
    parts: list[list[int]] = [[]]
    used = widths[0]
    for j in range(1, len(widths)):
        if parts[-1] and used + GAP + widths[j] > width:
            parts.append([])
            used = widths[0]
        parts[-1].append(j)
        used += GAP + widths[j]
    out = []
    for k, cols in enumerate(parts):
        keep = [0] + cols
        title = block.title if k == 0 else None
        out.append(Block([block.header[j] for j in keep], [[r[j] for j in keep] for r in block.rows],
                         [block.align[j] for j in keep], title, set(),
                         {(i, keep.index(j)) for i, j in block.marked if j in keep}))
    return out


def fit(block: Block, width: int | None, *, transpose_ok: bool = True) -> list[Block]:
    """The block as one or more blocks no wider than ``width`` (None or 0: as it is); see the module's docstring.

    >>> wide = Block(["run", "a long setting name", "another long setting", "loss"],
    ...              [["r1", "x", "y", "0.5"], ["r2", "z", "w", "0.25"]], ["l", "l", "l", "r"])
    >>> [b.width() for b in fit(wide, 80)]
    [52]
    >>> print("\\n".join(fit(wide, 40)[0].lines()))
    run                    r1    r2
    --------------------  ---  ----
    a long setting name     x     z
    another long setting    y     w
    loss                  0.5  0.25
    """
    if not width or block.width() <= width:
        return [block]
    shrunk = _shrunk(block, width)
    if shrunk is not None:
        return [shrunk]
    if not transpose_ok:
        return [block]
    side = transpose(block)
    return [side] if side.width() <= width else split_columns(side, width)
