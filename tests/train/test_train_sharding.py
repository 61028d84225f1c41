"""Mesh flags, logical axis rules, the FSDP-by-shape rule, batch divisibility."""

import flax.linen as nn
import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from effarch.train import sharding
from toy_model import ToyConfig, ToyLM

MESH_222 = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))


@pytest.mark.parametrize(
    "spec, shape",
    [("data=2,fsdp=-1,tensor=1", (2, -1, 1)), ("fsdp=4", (1, 4, 1)), ("2, 2, 2", (2, 2, 2))],
    ids=["named", "partial", "positional"],
)
def test_parse_mesh(spec, shape):
    assert sharding.parse_mesh(spec) == shape


@pytest.mark.parametrize("spec", ["expert=2", "2,2", "data=x"], ids=["unknown_axis", "two_sizes", "not_int"])
def test_parse_mesh_errors(spec):
    with pytest.raises(ValueError, match="data=D,fsdp=F,tensor=T"):
        sharding.parse_mesh(spec)


def test_resolve_mesh_shape():
    assert sharding.resolve_mesh_shape((2, -1, 1), 8) == (2, 4, 1)
    with pytest.raises(ValueError, match="has 4 devices but 8 are available"):
        sharding.resolve_mesh_shape((2, 2, 1), 8)
    with pytest.raises(ValueError, match="8 devices are not divisible by 3"):
        sharding.resolve_mesh_shape((3, -1, 1), 8)
    assert sharding.make_mesh((-1, 1, 1)).shape == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}


def test_fsdp_rule_by_shape():
    assert sharding.fsdp_spec((6, 8, 4), MESH_222) == P(None, "fsdp", None)
    assert sharding.fsdp_spec((3, 5), MESH_222) == P()
    assert sharding.fsdp_spec((7,), AbstractMesh((1, 1, 1), ("data", "fsdp", "tensor"))) == P()


def test_param_specs_follow_logical_names_and_fall_back_to_fsdp():
    model = ToyLM(ToyConfig(vocab_size=251, d_model=32))
    boxed = jax.eval_shape(lambda k: model.init(k, jax.numpy.zeros((1, 4), "int32"))["params"], jax.random.key(0))
    specs = sharding.param_specs(boxed, MESH_222)
    # vocab 251 is not divisible by tensor=2: that axis is dropped, embed keeps fsdp.
    assert specs["embed"] == P(None, "fsdp")
    assert specs["Dense_0"]["kernel"] == P("fsdp", "tensor")
    assert specs["Dense_1"]["kernel"] == P("tensor", "fsdp")
    assert specs["shift"] == P("fsdp", None)  # no names: FSDP rule on the first largest dim
    assert specs["Dense_0"]["bias"] == P("fsdp")
    assert specs["RMSNorm_0"]["scale"] == P("fsdp")
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(nn.unbox(boxed))


def test_batch_must_split_over_data_and_fsdp():
    sharding.check_batch_divisible(16, 2, MESH_222)
    with pytest.raises(ValueError, match=r"= 6 rows per microbatch is not divisible by data x fsdp = 2 x 2 = 4"):
        sharding.check_batch_divisible(12, 2, MESH_222)
