import pytest

from dapeng.errors import NotFoundError
from dapeng.registry import Registry


def test_registry_lazy_and_direct():
    reg = Registry("thing")
    reg.register("od", "collections:OrderedDict")

    @reg.register("double")
    def double(x: int) -> int:
        return 2 * x

    assert reg.names() == ["double", "od"]
    assert reg.create("double", x=3) == 6
    assert reg.create("od") == {}


def test_registry_unknown_name_suggests():
    reg = Registry("model")
    reg.register("lstm", "collections:OrderedDict")
    with pytest.raises(NotFoundError, match="unknown model 'lsmt'.*did you mean lstm"):
        reg.get("lsmt")
