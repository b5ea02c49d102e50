"""Hypothesis strategies and helpers shared by the fastconv.dask tests (test_dask*.py)."""
from hypothesis import strategies as st


@st.composite
def chunks_of(draw, n):
    """A chunking of an axis of length n: any cut points (chunks of 1, uneven last chunks)."""
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=min(4, n - 1)))) if n > 1 else []
    b = [0] + cuts + [n]
    return tuple(b[i + 1] - b[i] for i in range(len(b) - 1))


def pairs(lo, hi):
    return st.tuples(st.integers(lo, hi), st.integers(lo, hi))


def poisoned(shape, dtype, chunks):
    """A dask array whose blocks raise when computed: building on it must not compute it."""
    import dask.array as da

    def boom(block):
        raise AssertionError("computed while building the graph")
    return da.zeros(shape, dtype=dtype, chunks=chunks).map_blocks(boom, dtype=dtype)
