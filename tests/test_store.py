"""StreamStore's own surface (its behaviour is tested through the API elsewhere)."""

import builtins

from app.store import StreamStore


def test_no_method_shadows_a_builtin() -> None:
    # A method named `list` made the builtin unreachable by that name inside the class body.
    assert not {n for n in vars(StreamStore) if not n.startswith("_")} & set(dir(builtins))
    assert callable(StreamStore.list_names)
