"""Helpers shared by the benchmark table scripts (compare_table.py, store_table.py)."""
import statistics


def median_of(rows, key):
    """Median of `key` over the rows marked ok, and how many there were."""
    vals = []
    for r in rows:
        if r.get("ok") != "1":
            continue
        try:
            vals.append(float(r[key]))
        except (TypeError, ValueError, KeyError):
            continue
    return (statistics.median(vals) if vals else None), len(vals)


def fmt(v, width, prec):
    """A right-aligned number, or '-' when missing."""
    return f"{v:>{width}.{prec}f}" if v is not None else f"{'-':>{width}}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b
