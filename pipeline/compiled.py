"""Labelling's innermost loops, compiled (numba, cached on disk): what post-processing reads
of each cleaned structure at the model's resolution, where the model's masks cross their
threshold at original size, and those runs as run-length text.

Written as NumPy they were some forty array calls per structure of a few microseconds each
(issue 40); here each is one pass over the few pixels it needs, with the same floating-point
operations in the same order (NumPy's pairwise float32 sums included), so the features, the
runs and the text are byte for byte those of the array code they replaced (the tests hold that
code as their reference, and OpenCV's bilinear map). Nothing here recurses: numba's disk cache
cannot reload a recursive function (numba issue 6061). Imported where used, and by the worker
processes' fork server once (``pipeline.WORKER_MODULES``): importing numba costs half a
second, which no command that only reads the catalogue should pay. The first call in a fresh
installation compiles (a few seconds) and stores the machine code beside this file, or in
numba's user cache where the package's folder cannot be written; later processes load it.
"""

from __future__ import annotations

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True)


@_jit
def _value(arr: np.ndarray, a: int, j: int, i: int, size: int) -> float:
    """``arr[a]`` ringed by zeros: ``(j, i)`` index the ringed array (0 and ``size + 1`` the ring)."""
    if 1 <= j <= size and 1 <= i <= size:
        return np.float64(arr[a, j - 1, i - 1])
    return 0.0


@_jit
def _first_set(row: np.ndarray, start: int) -> int:
    while not row[start]:
        start += 1
    return start


@_jit
def _last_set(row: np.ndarray, start: int) -> int:
    end = start + 7
    while not row[end]:
        end -= 1
    return end


@_jit
def _straddling(above: np.ndarray, j: int, lo: int, hi: int, cells: np.ndarray) -> int:
    """The cells of ringed cell row ``j`` (between ringed rows ``j`` and ``j + 1`` of
    ``above``, 0/1 bytes) whose four corners do not all lie on one side of the level, into
    ``cells``; how many. Only cells ``lo`` to ``hi`` can: those beside a column with
    something above the level. Eight cells at a time: byte ``c`` of a word of a row and,
    shifted down a byte, byte ``c + 1`` (the words are little-endian)."""
    top, bottom = above[j].view(np.uint64), above[j + 1].view(np.uint64)
    n = 0
    for w in range(lo // 8, hi // 8 + 1):  # beyond lo and hi every corner is 0: nothing straddles
        top_next = (top[w] >> np.uint64(8)) | (top[w + 1] << np.uint64(56))
        bottom_next = (bottom[w] >> np.uint64(8)) | (bottom[w + 1] << np.uint64(56))
        flags = (top[w] ^ top_next) | (bottom[w] ^ bottom_next) | (top[w] ^ bottom[w])
        c = 8 * w
        while flags:
            if flags & np.uint64(0xFF):
                cells[n] = c
                n += 1
            flags >>= np.uint64(8)
            c += 1
    return n


@_jit
def runs_above(arr: np.ndarray, level: float, k: np.ndarray, t: np.ndarray, scale_x: float,
               offset_x: float, width: int, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The runs of original pixels where the bilinear map of each ``(S, S)`` array of ``arr``
    exceeds ``level``: ``(which array, row, first column, last column)``, sorted by array,
    row and column (see :meth:`pipeline.imaging.Geometry.runs_above`, which gives ``k``, each
    original row's ringed cell row, sorted, and ``t``, how far down that cell it lies).
    ``boxes``: ``(n, 4)``, each array's rows ``[y0, y1)`` and columns ``[x0, x1)`` beyond
    which nothing exceeds the level (only they are read).

    Along an original row the map is linear between two cache columns, so each crossing of
    ``level`` is solved exactly, and only in the cells whose corners straddle it."""
    n, size = arr.shape[0], arr.shape[1]
    out, found = np.empty((max(256, 4 * len(k)), 4), np.int64), 0  # (array, row, first, last) per run
    padded = 8 * ((size + 2) // 8 + 2)  # room for the word-aligned flags beyond the ring
    above = np.zeros((size + 2, padded), np.uint8)  # ringed by a column and row below the level
    row_any = np.zeros(size + 2, np.bool_)
    cells = np.empty(size + 1, np.int64)
    corners = np.empty((size + 1, 4), np.float64)  # each straddling cell's top left, its drop, top right, drop
    for a in range(n):
        row_any[:] = False
        above[:] = 0
        lo, hi = size + 1, 0  # the ringed columns with something above the level
        y0, y1, x0, x1 = boxes[a, 0], boxes[a, 1], boxes[a, 2], boxes[a, 3]
        for j in range(y0, y1):
            row, ringed = arr[a, j], above[j + 1]
            for i in range(x0, x1):
                ringed[i + 1] = np.float64(row[i]) > level
            words = ringed.view(np.uint64)  # the row's first and last columns above, a word at a time
            for w in range(len(words)):
                if words[w]:
                    row_any[j + 1] = True
                    lo = min(lo, _first_set(ringed, 8 * w))
                    break
            if row_any[j + 1]:
                for w in range(len(words) - 1, -1, -1):
                    if words[w]:
                        hi = max(hi, _last_set(ringed, 8 * w))
                        break
        cell_row, count = -1, 0
        for r in range(len(k)):
            j = k[r]
            if not (row_any[j] or row_any[j + 1]):
                continue
            if j != cell_row:
                cell_row, count = j, _straddling(above, j, lo - 1, hi, cells)
                for m in range(count):
                    c = cells[m]
                    corners[m, 0], corners[m, 2] = _value(arr, a, j, c, size), _value(arr, a, j, c + 1, size)
                    corners[m, 1] = _value(arr, a, j + 1, c, size) - corners[m, 0]
                    corners[m, 3] = _value(arr, a, j + 1, c + 1, size) - corners[m, 2]
            inside, x_in = False, 0.0
            for m in range(count):
                left = corners[m, 0] + t[r] * corners[m, 1]
                right = corners[m, 2] + t[r] * corners[m, 3]
                rising = right > level
                if (left > level) == rising:
                    continue
                if rising == inside:
                    raise ValueError("unpaired level crossings: the array is not finite")
                c = cells[m]
                u = (c - 1) + (level - left) / (right - left)  # cache column of the crossing
                x = (u + 0.5) / scale_x - 0.5 - offset_x  # ... and original column
                # beyond the edge columns, the edge column's values: out to the original's border
                if c == 0 and rising:
                    x = -1.0
                elif c == size and not rising:
                    x = np.float64(width)
                if rising:
                    inside, x_in = True, x
                    continue
                inside = False
                first = max(int(np.floor(x_in)) + 1, 0)
                last = min(int(np.ceil(x)) - 1, width - 1)
                if first <= last:
                    if found == len(out):
                        out = np.concatenate((out, np.empty_like(out)))
                    out[found, 0], out[found, 1], out[found, 2], out[found, 3] = a, r, first, last
                    found += 1
            if inside:
                raise ValueError("unpaired level crossings: the array is not finite")
    return out[:found, 0].copy(), out[:found, 1].copy(), out[:found, 2].copy(), out[:found, 3].copy()


@_jit
def _digits(value: int) -> int:
    d = 1
    while value >= 10:
        value //= 10
        d += 1
    return d


@_jit
def _put(out: np.ndarray, at: int, value: int, space: bool) -> int:
    """``value`` as ASCII decimals at ``out[at:]``, after a space if ``space``; where it ends."""
    if space:
        out[at] = 32
        at += 1
    end = at + _digits(value)
    p = end
    while True:
        p -= 1
        out[p] = 48 + value % 10
        value //= 10
        if value == 0:
            break
    return end


@_jit
def rle_text(rows: np.ndarray, first: np.ndarray, last: np.ndarray, bounds: np.ndarray,
             width: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs of several masks of one image (mask ``m``: runs ``bounds[m]:bounds[m + 1]`` of
    ``rows``, ``first``, ``last``, sorted, not overlapping) -> CheXmask's run-length text
    (``"start length ..."``, 1-based starts into the row-major flattened image; a run that
    carries on the next row merges with it): one byte array and each mask's text's end in it."""
    out = np.empty(42 * len(rows) + 1, np.uint8)  # two numbers of up to 20 digits a run, spaced
    ends = np.empty(len(bounds) - 1, np.int64)
    at = 0
    for m in range(len(bounds) - 1):
        start, end, written = -1, -1, False
        for q in range(bounds[m], bounds[m + 1]):
            s = rows[q] * width + first[q]
            e = rows[q] * width + last[q] + 1
            if s == end:  # carries on the run before
                end = e
                continue
            if start >= 0:
                at = _put(out, at, start + 1, written)
                at = _put(out, at, end - start, True)
                written = True
            start, end = s, e
        if start >= 0:
            at = _put(out, at, start + 1, written)
            at = _put(out, at, end - start, True)
        ends[m] = at
    return out[:at], ends


@_jit
def extents(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each ``(S, S)`` array of ``probs``'s largest value in every row and in every column
    (``(C, S)`` each: where something lies above a level), in one pass (NumPy made a
    ``(C, S, S)`` mask for it)."""
    n, h, w = probs.shape
    rows, cols = np.zeros((n, h), probs.dtype), np.zeros((n, w), probs.dtype)
    for a in range(n):
        for y in range(h):
            most = rows[a, y]  # from 0, as the columns: a NaN (never above a level) is passed over
            for x in range(w):
                v = probs[a, y, x]
                most = max(most, v)
                cols[a, x] = max(cols[a, x], v)
            rows[a, y] = most
    return rows, cols


@_jit
def _block_sum(a: np.ndarray, lo: int, n: int) -> np.float32:
    """NumPy's float32 sum of ``a[lo:lo + n]``, ``n`` at most 128: eight partial sums."""
    if n < 8:
        res = np.float32(0.0)
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r = a[lo:lo + 8].copy()
    i = 8
    while i < n - n % 8:
        for q in range(8):
            r[q] += a[lo + i + q]
        i += 8
    res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@_jit
def _pairwise_sum(a: np.ndarray, n: int) -> np.float32:
    """NumPy's float32 sum of ``a[:n]``: its pairwise summation (halves, cut at a multiple of
    8, down to blocks of at most 128), so a compiled reduction reads the same last bit as the
    array code it replaced. The halving is walked with a stack of its own: numba's cache
    cannot reload a recursive function (numba issue 6061: a crash in the next process)."""
    frames = np.empty((192, 3), np.int64)  # (start, length, 0: to split / 1: to join)
    values = np.empty(64, np.float32)
    frames[0, 0], frames[0, 1], frames[0, 2] = 0, n, 0
    top, held = 1, 0
    while top:
        top -= 1
        lo, m, join = frames[top, 0], frames[top, 1], frames[top, 2]
        if join:
            held -= 1
            values[held - 1] = values[held - 1] + values[held]
        elif m <= 128:
            values[held] = _block_sum(a, lo, m)
            held += 1
        else:
            half = m // 2
            half -= half % 8
            for start, length, step in ((lo, m, 1), (lo + half, m - half, 0), (lo, half, 0)):
                frames[top, 0], frames[top, 1], frames[top, 2] = start, length, step
                top += 1
    return values[0]


@_jit
def _hull_area(cleaned: np.ndarray) -> float:
    """The area of the convex hull of the set pixels' centres (OpenCV's contourArea of
    convexHull of the outline: integer corners, so the shoelace sum is exact either way)."""
    h, w = cleaned.shape
    px, py, n = np.empty(2 * h, np.int64), np.empty(2 * h, np.int64), 0
    for y in range(h):  # each row's first and last set pixel (every corner of the hull is one), in order
        first, last = -1, -1
        for x in range(w):
            if cleaned[y, x]:
                if first < 0:
                    first = x
                last = x
        if first >= 0:
            px[n], py[n] = first, y
            n += 1
            if last != first:
                px[n], py[n] = last, y
                n += 1
    hx, hy, k = np.empty(2 * n + 1, np.int64), np.empty(2 * n + 1, np.int64), 0
    for chain in range(2):  # Andrew's monotone chain: one side, top to bottom, then the other, back
        floor = 2 if chain == 0 else k + 1
        for i in range(n) if chain == 0 else range(n - 2, -1, -1):
            while k >= floor and ((hx[k - 1] - hx[k - 2]) * (py[i] - hy[k - 2])
                                  - (hy[k - 1] - hy[k - 2]) * (px[i] - hx[k - 2])) <= 0:
                k -= 1  # no turn the same way: not a corner
            hx[k], hy[k] = px[i], py[i]
            k += 1
    twice = 0
    for i in range(k - 1):
        twice += hx[i] * hy[i + 1] - hx[i + 1] * hy[i]
    return abs(twice) / 2.0


@_jit
def clean_window(probs: np.ndarray, y0: int, x0: int, unit: np.float32, cleaned: np.ndarray, near: np.ndarray,
                 eroded: np.ndarray, soft: np.ndarray, mask: np.ndarray, scratch: np.ndarray,
                 ) -> tuple[int, np.float32, int, int, int, int, int, int, int, np.float32, float]:
    """What post-processing reads of one structure's ``(S, S)`` probabilities (``probs``,
    float or uint8 times ``unit``) in the window at ``(y0, x0)`` where it was cleaned
    (``pipeline.label.batch._cleaned``), in one pass: ``cleaned``, the cleaned mask there,
    ``near`` and ``eroded``, it dilated and eroded a pixel (0/1 each; where they differ lies its
    outline, a pixel either side: OpenCV's morphological gradient). The
    probabilities near the mask (filled holes 0.75) go into ``soft``, the mask into ``mask``
    (both zero there before); ``scratch``: float32 room for twice the window's pixels.

    Returns, each as NumPy computed it: the mask's area, the float32 sum of ``soft`` over it,
    the sum and count of the columns it touches, its box (x0, y0, x1, y1 in the window), the
    pixels with ``0.1 < p < 0.9``, the float32 mean of ``|2 p - 1|`` on the outline, and the
    area of its convex hull."""
    h, w = cleaned.shape
    lo, hi = np.float32(0.1), np.float32(0.9)
    products, edges = scratch[:h * w], scratch[h * w:2 * h * w]  # room the caller holds: no allocation here
    products[:] = 0
    area, uncertain, n_edges, col_sum, col_n = 0, 0, 0, 0, 0
    bx0, by0, bx1, by1 = w, h, -1, -1
    for y in range(h):
        for x in range(w):
            v = np.float32(probs[y0 + y, x0 + x]) * unit
            if lo < v < hi:
                uncertain += 1
            if not near[y, x]:  # nothing to keep: soft and mask hold 0 there already
                continue
            part = v
            if cleaned[y, x]:
                if part <= 0.5:
                    part = np.float32(0.75)
                products[y * w + x] = part
                mask[y0 + y, x0 + x] = True
                area += 1
                bx0, by0, bx1, by1 = min(bx0, x), min(by0, y), max(bx1, x), max(by1, y)
            soft[y0 + y, x0 + x] = part
            if not eroded[y, x]:  # near, not eroded: the outline
                edges[n_edges] = abs(np.float32(2.0) * v - np.float32(1.0))
                n_edges += 1
    for x in range(bx0, bx1 + 1):
        for y in range(by0, by1 + 1):
            if cleaned[y, x]:
                col_sum += x
                col_n += 1
                break
    margin = _pairwise_sum(edges, n_edges) / np.float32(n_edges) if n_edges else np.float32(np.nan)
    return (area, _pairwise_sum(products, h * w), col_sum, col_n, bx0, by0, bx1, by1, uncertain, margin,
            _hull_area(cleaned) if area else 0.0)


def _load() -> None:
    """Every function's machine code for the arguments labelling gives them, loaded (or, the
    first time, compiled and stored) now: a fork server that imports this module hands it
    to every worker it forks, which then start computing at once (numba's own start, about
    0.4 s, is paid here once)."""
    empty = np.zeros(0, np.int64)
    runs_above(np.zeros((1, 2, 2), np.float32), 0.5, np.ones(1, np.int64), np.zeros(1), 1.0, 0.0, 2,
               np.array([[0, 2, 0, 2]], np.int64))
    rle_text(empty, empty, empty, np.zeros(1, np.int64), 1)
    probs = np.zeros((1, 4, 4), np.uint8)
    extents(probs)
    cleaned = np.zeros((4, 4), np.bool_)
    clean_window(probs[0], 0, 0, np.float32(1 / 255), cleaned, cleaned.view(np.uint8), cleaned.view(np.uint8),
                 np.zeros((4, 4), np.float32), np.zeros((4, 4), np.bool_), np.zeros(32, np.float32))


_load()
