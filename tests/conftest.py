"""Suite-wide settings: XLA on CPU, and the tier of heavy cases.

``pytest -n 2`` runs two workers on a 2-core machine, so each worker's XLA runs
single-threaded: this avoids oversubscribing the cores and the rare XLA-CPU
thread-pool stall seen under heavy load. Users who set XLA_FLAGS keep theirs.
(``intra_op_parallelism_threads=1`` is not an XLA flag, and XLA stops reading
XLA_FLAGS at the first word without ``--``: any flag meant to count must come
before it, as ``effarch._xla_workarounds`` puts its own.)

The cases in ``HEAVY`` (each 4-37 s of CPU, mostly compilation) run with
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
    # The op's forms: bf16, T = 1000 and G = 1 cases whose f32, T <= 63 and G = 2 cases stay.
    "ops/test_linear_attention.py::test_forms_agree_values_and_grads[chunked-scalar-weak-bf16]",
    "ops/test_linear_attention.py::test_forms_agree_values_and_grads[chunked-channel-weak-bf16]",
    "ops/test_linear_attention.py::test_awkward_lengths_and_key_dim[channel-1000]",
    "ops/test_linear_attention.py::test_awkward_lengths_and_key_dim[scalar-1000]",
    "ops/test_linear_attention.py::test_grouped_queries_and_keys_equal_the_recurrence_on_repeated_heads[1-none]",
    "ops/test_linear_attention.py::test_grouped_queries_and_keys_equal_the_recurrence_on_repeated_heads[1-head]",
    "ops/test_linear_attention.py::test_grouped_queries_and_keys_equal_the_recurrence_on_repeated_heads[1-channel]",
    "ops/test_linear_attention.py::test_strong_decay_long_sequence_is_finite[channel-bf16]",
    "ops/test_linear_attention.py::test_strong_decay_long_sequence_is_finite[scalar-bf16]",
    # Through the mixers: the quadratic form stays for mamba2, mlstm, gla and linear_attention (the op
    # tests check it for every decay); the second preset of a family keeps its other tests.
    "mixers/test_mixers_common.py::test_implementations_agree[rwkv6-tiny-quadratic]",
    "mixers/test_mixers_common.py::test_implementations_agree[mlstm7b-tiny-quadratic]",
    "mixers/test_mixers_common.py::test_implementations_agree[linear_attention-tiny_based-quadratic]",
    "mixers/test_mixers_common.py::test_implementations_agree[linear_attention-tiny_hedgehog-quadratic]",
    "mixers/test_mixers_common.py::test_implementations_agree[retnet-tiny-quadratic]",
    "mixers/test_mixers_common.py::test_implementations_agree[hgrn2-tiny-quadratic]",
    "mixers/test_mixers_common.py::test_implementations_agree[s4d-tiny_real-chunked]",
    "mixers/test_mixers_common.py::test_implementations_agree[mamba-tiny_jamba-chunked]",
    "mixers/test_mixers_common.py::test_bfloat16_compute_is_finite[attention-tiny_conv]",
    "mixers/test_mixers_common.py::test_bfloat16_compute_is_finite[attention-tiny_local]",
    "mixers/test_mixers_common.py::test_bfloat16_compute_is_finite[mamba-tiny_jamba]",
    # The pad token's gradient: one case per architecture stays (the three with a padding_idx and two without).
    "convert/test_convert_parity.py::test_embedding_gradient_matches_transformers_with_the_pad_token_in_the_input[qwen3next-moe]",
    "convert/test_convert_parity.py::test_embedding_gradient_matches_transformers_with_the_pad_token_in_the_input[jamba-moe]",
    "convert/test_convert_parity.py::test_embedding_gradient_matches_transformers_with_the_pad_token_in_the_input[rgemma-tied]",
    "convert/test_convert_parity.py::test_embedding_gradient_matches_transformers_with_the_pad_token_in_the_input[mamba-tied]",
    "convert/test_convert_parity.py::test_embedding_gradient_matches_transformers_with_the_pad_token_in_the_input[mamba2-tied]",
    # Others: the lighter case of each stays (gqa; the chunked form at the same shapes; the f32 kernel cases).
    "models/test_linearize.py::test_linear_attention_equals_attention_when_all_scores_are_equal[mha]",
    "ops/test_selective_scan.py::test_forms_match_reference[T63_G3_f32_large_dt-recurrent]",
    "pallas_kernels/selective_scan/test_selective_scan_kernel.py::test_gpu_kernel_interpret[T200_G4_bf16]",
    # Session 9: a second case of each of these stays (max_prob and saturation; the GPU-interpret and f32
    # TPU cases; the decode bf16 case; the base presets' jit/grad/vmap check).
    "models/test_early_exit.py::test_score_keeps_to_the_early_exit_definition[margin]",
    "pallas_kernels/linear_scan/test_linear_scan_kernel.py::test_kernel_interpret[T300_bf16_weak_packed-tpu]",
    "pallas_kernels/selective_scan/test_selective_scan_kernel.py::test_tpu_kernel_interpret[T63_G1_bf16_tiny_dt]",
    "ops/test_attention.py::test_chunked_matches_xla[segments_causal_window20-bfloat16]",
    "ops/test_attention.py::test_chunked_matches_xla[mha_T63_K60_softcap-bfloat16]",
    "mixers/test_mixers_common.py::test_jit_grad_vmap[gated_deltanet-tiny_grouped]",
    "mixers/test_mixers_common.py::test_jit_grad_vmap[attention-tiny_local]",
    "mixers/test_mixers_common.py::test_jit_grad_vmap[attention-tiny_conv]",
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
            heavy = heavy or mixer not in BF16_DEFAULT
        if heavy:
            item.add_marker(pytest.mark.slow)


# The cache directory, from the controller to the workers it starts.
_CACHE_ENV = "EFFARCH_TEST_XLA_CACHE"


def pytest_configure(config):
    """One persistent XLA compilation cache shared by this run's workers, removed at the end.

    The suite's time is mostly XLA compiling (about 70% of it, measured per test), and the two xdist
    workers compile many of the same programs (the same model pieces and initialisers): sharing
    the cache cut ``tests/models/test_lm.py`` from 98 s to 69 s on 2 cores. The directory is new
    for every run, so no run reuses an earlier one's programs. A cache the user configured
    (``JAX_COMPILATION_CACHE_DIR``) is left alone.
    """
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    if not hasattr(config, "workerinput"):  # the controller (or a single process): make the directory
        import tempfile

        config._effarch_xla_cache = tempfile.mkdtemp(prefix="effarch-test-xla-")
        os.environ[_CACHE_ENV] = config._effarch_xla_cache  # inherited by the workers it starts
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    path = getattr(config, "_effarch_xla_cache", None)
    if path:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
