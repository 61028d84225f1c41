"""Suite-wide settings: XLA on CPU, and the tier of heavy cases.

``pytest -n 2`` runs two workers on a 2-core machine, so each worker's XLA runs
single-threaded: this avoids oversubscribing the cores and the rare XLA-CPU
thread-pool stall seen under heavy load. Users who set XLA_FLAGS keep theirs.

The cases in ``HEAVY`` (each 13-37 s of CPU, mostly compilation) run with
``pytest -m slow``; every capability they check keeps a lighter case in the
default run, which must stay within CI's budget of about 15 minutes on 2 cores.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
# With the ``aot`` extra installed, every xdist worker loads libtpu (for the
# compile-only TPU tests); by default libtpu allows one process per machine.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402

HEAVY = {
    # Layer-level checks whose parts the generic mixer tests already cover.
    "mixers/test_deltanet.py::test_layer_matches_the_per_step_forward[gated_deltanet]",
    "mixers/test_s4d.py::test_rotated_scan_matches_complex_reference[T63]",
    "mixers/test_s4d.py::test_fft_form_equals_recurrent_form_through_the_mixer[lin]",
    "mixers/test_rwkv.py::test_rwkv6_wkv_matches_the_per_step_loop[packed]",
    "mixers/test_xlstm.py::test_stabilised_cell_equals_unstabilised_where_finite",
    "layers/test_conv.py::test_fft_long_conv_matches_direct[T13]",
    # Models: one representative of each stays (forward shapes, decode, MoE, generate).
    "models/test_lm.py::test_mod_model_routes_and_refuses_cache",
    "models/test_lm.py::test_remat_and_untied_embeddings",
    "models/test_lm.py::test_cache_decode_matches_full_forward[MA]",
    "layers/test_moe.py::test_matches_dense_reference_with_ample_capacity[E5k3]",
    "layers/test_moe.py::test_moe_language_model_reports_aux_and_has_router_gradients",
    # Kernels in interpret mode: lighter cases of each decay form stay.
    "pallas_kernels/chunked_linear_attention/test_chunked_linear_attention_kernel.py::test_matches_recurrence[gpu-scalar-bfloat16-T63-K60V60-strong-seg]",
    "pallas_kernels/chunked_linear_attention/test_chunked_linear_attention_kernel.py::test_matches_recurrence[tpu-scalar-float32-T63-K16V16-mixed-seg-init]",
    "pallas_kernels/chunked_linear_attention/test_chunked_linear_attention_kernel.py::test_matches_recurrence[gpu-channel-float32-T200-K16V16-mixed-init]",
    "pallas_kernels/chunked_linear_attention/test_chunked_linear_attention_kernel.py::test_matches_recurrence[gpu-none-bfloat16-T63-K64V64-mixed-init]",
}
# bfloat16 at T=256 through every mixer is the slow tier; these families keep it by default.
BF16_DEFAULT = {"attention", "mamba2", "gla", "mamba"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        nodeid = item.nodeid.removeprefix("tests/")
        heavy = nodeid in HEAVY
        if "test_bfloat16_compute_is_finite[" in nodeid:
            mixer = nodeid.split("[", 1)[1].split("-", 1)[0]
            heavy = mixer not in BF16_DEFAULT
        if heavy:
            item.add_marker(pytest.mark.slow)
