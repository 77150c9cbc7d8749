"""policies.gc_freeze: what is alive is frozen out of the collector's walks; garbage is collected first."""
from __future__ import annotations

import gc
import weakref

from policies.gc_freeze import freeze_long_lived


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_freeze_collects_garbage_first_then_freezes_what_is_alive():
    gc.unfreeze()
    garbage = Node()
    dead = weakref.ref(garbage)
    del garbage  # unreachable, kept alive only by its own cycle
    kept = Node()
    frozen = freeze_long_lived()
    assert dead() is None  # collected before the freeze, not frozen forever
    assert frozen > 0 and gc.get_freeze_count() > 0  # (frozen objects that die leave the count)
    assert not any(o is kept for o in gc.get_objects())  # frozen objects are out of the collector's lists
    gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())
