//! Randomised model shapes (proptest): for each family, specs with random head counts, head
//! dimensions, GQA ratios, expert counts and top-k are compiled for the host and checked
//! against the reference executor (f64) on a prefill of random length (crossing chunk
//! boundaries inside one launch, with a partial last chunk) and a decode step.

use proptest::prelude::*;

use crate::common::rel_err;
use lamina_compiler::build::build;
use lamina_compiler::passes::Options;
use lamina_ir::model::Model;
use lamina_runtime::host::HostEngine;
use lamina_runtime::reference::Reference;
use lamina_runtime::Executor;
use lamina_targets::Target;

const TOL: f64 = 1e-5;

/// The MoE block shared by the families.
#[derive(Debug, Clone)]
struct Moe {
    experts: usize,
    top_k: usize,
    intermediate: usize,
    sigmoid: bool,
    groups: Option<(usize, usize)>,
}

fn moe() -> impl Strategy<Value = Moe> {
    (
        1usize..=3,
        1usize..=4,
        prop::sample::select(vec![8usize, 24]),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(e_pow, k, inter, sigmoid, grouped)| {
            let experts = 1 << (e_pow + 1); // 4, 8 or 16
            let top_k = k.min(experts);
            // Group-limited routing (DeepSeek-V3) is sigmoid-routed and needs top-k ≤ the
            // experts of the kept groups.
            let groups =
                (grouped && sigmoid && experts >= 8 && top_k <= experts / 2).then_some((4, 2));
            Moe {
                experts,
                top_k,
                intermediate: inter,
                sigmoid,
                groups,
            }
        })
}

fn moe_toml(m: &Moe) -> String {
    let mut s = format!(
        "[ffn.M]\nkind = \"moe\"\nexperts = {}\ntop_k = {}\nintermediate = {}\nrouter = \"{}\"\nrenormalize = true\nshared_intermediate = 16\n",
        m.experts,
        m.top_k,
        m.intermediate,
        if m.sigmoid { "sigmoid" } else { "softmax" }
    );
    if m.sigmoid {
        s += "correction_bias = true\nrouted_scaling = 2.0\n";
    }
    if let Some((g, t)) = m.groups {
        s += &format!("groups = {g}\ntopk_groups = {t}\n");
    }
    s
}

fn header(name: &str, hidden: usize, pattern: &str) -> String {
    format!(
        "name = \"{name}\"\nvocab_size = 97\nhidden_size = {hidden}\nnum_layers = {}\n\n[norm]\neps = 1e-6\n\n[layers]\npattern = \"{pattern}\"\nffn_pattern = \"M\"\n\n",
        pattern.len()
    )
}

/// Compiles `spec`, then compares prefill (`len` tokens, one launch) and one decode step.
fn check(spec: &str, len: usize) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.toml");
    std::fs::write(&path, spec).unwrap();
    let m = Model::open(&path).map_err(|e| TestCaseError::fail(format!("{e}\n{spec}")))?;
    let options = Options {
        max_batch: 2,
        max_context: 160,
        max_prefill_rows: 160,
        keep_values: false,
        weights_bf16: false,
        host_lanes: 1,
        decode_splits: 1,
        tensor_cores: false,
        tf32_products: false,
        warpgroup_tiles: false,
        bf16_handoffs: false,
        bf16_caches: false,
        strict_fp: false,
    };
    let art = dir.path().join("artifact");
    build(&m, &art, Target::Host, options, 7)
        .map_err(|e| TestCaseError::fail(format!("{e}\n{spec}")))?;
    let mut e = HostEngine::load(&art, None).unwrap();
    let w = m.weights(7).unwrap();
    let r = Reference::<f64>::new(&m.graph, &w);
    let v = m.graph.vocab_size;
    let prompt: Vec<i64> = (0..len).map(|i| ((i * 31 + 5) % v) as i64).collect();
    let mut sess = r.new_session();
    let (want, _) = r.forward(&mut sess, &prompt, &[]).unwrap();
    e.reset(1).unwrap();
    let got: Vec<f64> = e
        .prefill(1, &prompt)
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect();
    let err = rel_err(&got, &want.data);
    prop_assert!(err <= TOL, "prefill of {len}: rel err {err:.3e}\n{spec}");
    let (want, _) = r.forward(&mut sess, &[3], &[]).unwrap();
    let got: Vec<f64> = e
        .decode(&[(1, 3)])
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect();
    let err = rel_err(&got, &want.data);
    prop_assert!(err <= TOL, "decode after {len}: rel err {err:.3e}\n{spec}");
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 8,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Gated DeltaNet + gated GQA (Qwen3-Next layout).
    #[test]
    fn gated_deltanet_shapes(
        key_heads in 1usize..=2,
        v_per_k in 1usize..=2,
        dk in prop::sample::select(vec![8usize, 16, 32]),
        dv in prop::sample::select(vec![8usize, 16, 32]),
        heads in prop::sample::select(vec![2usize, 4]),
        gqa in prop::sample::select(vec![1usize, 2]),
        head_dim in prop::sample::select(vec![8usize, 16]),
        moe in moe(),
        len in 1usize..=150,
    ) {
        let spec = header("gdn-shape", 32, "LA") + &format!(
            "[mixer.L]\nkind = \"gated_delta\"\nkey_heads = {key_heads}\nvalue_heads = {}\nkey_head_dim = {dk}\nvalue_head_dim = {dv}\nconv_kernel = 4\n\n\
             [mixer.A]\nkind = \"gqa\"\nheads = {heads}\nkv_heads = {}\nhead_dim = {head_dim}\noutput_gate = true\nqk_norm = true\nrope = {{ theta = 10000.0, rotary_dim = {} }}\n\n",
            key_heads * v_per_k, heads / gqa, head_dim / 2
        ) + &moe_toml(&moe);
        check(&spec, len)?;
    }

    /// KDA + MLA (Kimi Linear layout).
    #[test]
    fn kda_mla_shapes(
        heads in 1usize..=3,
        dk in prop::sample::select(vec![8usize, 16, 32]),
        rank in prop::sample::select(vec![8usize, 16]),
        kv_lora in prop::sample::select(vec![16usize, 32]),
        nope in prop::sample::select(vec![8usize, 16]),
        rope in prop::sample::select(vec![4usize, 8]),
        moe in moe(),
        len in 1usize..=150,
    ) {
        let spec = header("kda-shape", 32, "KA") + &format!(
            "[mixer.K]\nkind = \"kda\"\nheads = {heads}\nhead_dim = {dk}\nconv_kernel = 4\ngate_rank = {rank}\noutput_gate_rank = {rank}\n\n\
             [mixer.A]\nkind = \"mla\"\nheads = {heads}\nkv_lora_rank = {kv_lora}\nqk_nope_head_dim = {nope}\nqk_rope_head_dim = {rope}\nv_head_dim = {nope}\nnorm_eps = 1e-6\n\n"
        ) + &moe_toml(&moe);
        check(&spec, len)?;
    }

    /// Lightning attention + GQA (MiniMax-01 layout, post-norm residuals).
    #[test]
    fn lightning_shapes(
        heads in prop::sample::select(vec![2usize, 4, 8]),
        head_dim in prop::sample::select(vec![8usize, 16, 32]),
        gqa in prop::sample::select(vec![1usize, 2]),
        moe in moe(),
        len in 1usize..=150,
    ) {
        let spec = header("lightning-shape", 32, "LLA") + &format!(
            "[residual]\nstyle = \"scaled_post_norm\"\nlinear_alpha = 1.5\nattention_alpha = 1.5\nffn_alpha = 1.5\n\n\
             [mixer.L]\nkind = \"lightning\"\nheads = {heads}\nhead_dim = {head_dim}\nnorm_eps = 1e-6\n\n\
             [mixer.A]\nkind = \"gqa\"\nheads = {heads}\nkv_heads = {}\nhead_dim = {head_dim}\nrope = {{ theta = 10000.0, rotary_dim = {head_dim} }}\n\n",
            heads / gqa
        ) + &moe_toml(&moe);
        check(&spec, len)?;
    }
}
