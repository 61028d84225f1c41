"""Prints the recurrent state size of every mixer at d_model=1024 with its default options.

The size is counted from the mixer's own ``init_cache`` (``jax.eval_shape``,
nothing is allocated): floating-point elements per sequence, per layer, so
short-convolution windows are included and position counters are not; a
complex element counts as two. Attention and Hyena caches grow with
``max_len`` (given on the command line, default 2048); attention with a window
keeps only the window.

    python docs/mixer_state_sizes.py [--max_len 2048]
"""

import argparse

import jax
import jax.numpy as jnp

from effarch import mixers

D_MODEL = 1024


def state_elements(name: str, d_model: int = D_MODEL, max_len: int = 2048, **options) -> int:
    """Floating-point elements in ``init_cache(1, max_len)`` of mixer ``name``."""
    mixer = mixers.build(name, d_model=d_model, **options)
    cache = jax.eval_shape(lambda: mixer.init_cache(1, max_len, jnp.float32))
    total = 0
    for leaf in jax.tree.leaves(cache):
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            total += 2 * leaf.size
        elif jnp.issubdtype(leaf.dtype, jnp.floating):
            total += leaf.size
    return total


def main(max_len: int) -> None:
    print(f"| mixer | state elements at d_model={D_MODEL} (max_len={max_len}) |")
    print("|---|---|")
    for name in mixers.names():
        print(f"| {name} | {state_elements(name, max_len=max_len):,} |")
    print(f"| attention, window=512 | {state_elements('attention', max_len=max_len, window=512):,} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_len", type=int, default=2048,
                        help="length the attention and Hyena caches are sized for (default 2048)")
    args = parser.parse_args()
    if args.max_len < 1:
        parser.error(f"--max_len={args.max_len}; expected a positive number of tokens.")
    main(args.max_len)
