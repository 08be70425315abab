"""The collective-bytes counter: synchronous and asynchronous HLO forms, and a program compiled on a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.hlo_collectives import collective_bytes
from tests.helpers import cpu_devices

# One instruction per line, as compiled HLO prints them (the asynchronous forms are a GPU's).
GPU_STYLE = """
  %p = f32[4,8]{1,0} parameter(0)
  %ag = f32[16,8]{1,0} all-gather(f32[4,8]{1,0} %p), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %ags = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(f32[4,8]{1,0} %p), channel_id=2, dimensions={0}
  %agd = f32[16,8]{1,0} all-gather-done((f32[4,8]{1,0}, f32[16,8]{1,0}) %ags)
  %agc = ((s32[1024]{0},s32[512]{0}), (s32[4096]{0},s32[2048]{0})) all-gather-start(%a, %b), dimensions={0}
  %cps = (bf16[2,16]{1,0}, bf16[2,16]{1,0}, u32[], u32[]) collective-permute-start(%x), source_target_pairs={{0,1}}
  %cpd = bf16[2,16]{1,0} collective-permute-done(%cps)
  %ars = f32[32]{0} all-reduce-start(f32[32]{0} %g), to_apply=%add
  %ard = f32[32]{0} all-reduce-done(f32[32]{0} %ars)
  %art = (f32[3]{0}, f32[5]{0}, /*index=2*/f32[7]{0}) all-reduce(%u, %v, %w), to_apply=%add
  %rss = ((f32[8]{0}), f32[2]{0}) reduce-scatter-start(%y), dimensions={0}, to_apply=%add
  %rsd = f32[2]{0} reduce-scatter-done(%rss)
  %as = ((f32[8,4]{1,0}), f32[8,4]{1,0}, s32[]) async-start(%z), calls=%wrapped
  %inner = f32[8,4]{1,0} all-to-all(f32[8,4]{1,0} %z), dimensions={0}
"""


def test_each_form_counts_what_the_device_receives():
    moved = collective_bytes(GPU_STYLE)
    assert moved["all-gather"] == 2 * 16 * 8 * 4 + (4096 + 2048) * 4  # sync + async, combined: the outputs
    assert moved["collective-permute"] == 2 * 16 * 2  # the output, not the operand or the contexts
    assert moved["all-reduce"] == 32 * 4 + (3 + 5 + 7) * 4
    assert moved["reduce-scatter"] == 2 * 4
    assert moved["all-to-all"] == 8 * 4 * 4  # the wrapped op, not its async-start wrapper


def test_an_unknown_element_type_is_named():
    with pytest.raises(ValueError, match="unknown HLO element type 'c128'"):
        collective_bytes("  %ag = c128[4]{0} all-gather(%p), dimensions={0}")


def test_a_program_compiled_on_a_mesh():
    # Given an array split over 4 devices that each device needs whole
    mesh = jax.sharding.Mesh(np.array(cpu_devices(4)), ("x",))
    x = jax.device_put(jnp.zeros((16, 8), jnp.float32), NamedSharding(mesh, P("x")))
    whole = jax.jit(lambda a: a * 2, out_shardings=NamedSharding(mesh, P()))
    # when the compiled program is read, each device receives the whole array once
    moved = collective_bytes(whole.lower(x).compile().as_text())
    assert sum(moved.values()) == 16 * 8 * 4, moved
