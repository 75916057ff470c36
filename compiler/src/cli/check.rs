use std::path::Path;

use lamina_ir::model::Model;
use lamina_ir::stats::model_stats;

use super::CliResult;

/// `1234567` → `1.23M`.
pub fn human(n: u64) -> String {
    let f = n as f64;
    for (div, suffix) in [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")] {
        if f >= div {
            return format!("{:.2}{suffix}", f / div);
        }
    }
    n.to_string()
}

pub fn bytes(n: u64) -> String {
    let f = n as f64;
    for (div, suffix) in [
        (1u64 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ] {
        if f >= div as f64 {
            return format!("{:.2} {suffix}", f / div as f64);
        }
    }
    format!("{n} B")
}

pub fn check(model: &Path) -> CliResult {
    let m = Model::open(model).map_err(|e| e.to_string())?;
    let s = model_stats(&m.graph);
    let spec = &m.spec;
    println!("model       {} ({})", spec.name, m.describe_source());
    println!(
        "shape       vocab {}, hidden {}, {} layers{}",
        spec.vocab_size,
        spec.hidden_size,
        spec.num_layers,
        if spec.tie_embeddings {
            ", tied embeddings"
        } else {
            ""
        }
    );
    let plan = spec.layer_plan();
    let pattern: String = plan.iter().map(|l| l.mixer_letter.as_str()).collect();
    let ffns: String = plan.iter().map(|l| l.ffn_letter.as_str()).collect();
    println!("mixers      {pattern}");
    println!("ffns        {ffns}");
    for (letter, mx) in &spec.mixer {
        let n = plan.iter().filter(|l| &l.mixer_letter == letter).count();
        println!("  {letter} = {:<12} x{n}", mx.kind_name());
    }
    for (letter, f) in &spec.ffn {
        let n = plan.iter().filter(|l| &l.ffn_letter == letter).count();
        let kind = match f {
            lamina_ir::spec::FfnSpec::Swiglu { intermediate } => format!("swiglu {intermediate}"),
            lamina_ir::spec::FfnSpec::Moe(m) => format!(
                "moe {} experts top-{}{}",
                m.experts,
                m.top_k,
                if m.shared_intermediate > 0 {
                    " + shared"
                } else {
                    ""
                }
            ),
        };
        println!("  {letter} = {kind:<28} x{n}");
    }
    println!(
        "parameters  {} total, {} active per token ({} without embeddings and LM head)",
        human(s.total_params),
        human(s.active_params),
        human(s.active_non_embedding)
    );
    let kinds: Vec<String> = s
        .params_by_kind
        .iter()
        .map(|(k, v)| format!("{k} {}", human(*v)))
        .collect();
    println!("  by kind   {}", kinds.join(", "));
    let total_bytes: u64 = s.weight_bytes_by_dtype.values().sum();
    let by: Vec<String> = s
        .weight_bytes_by_dtype
        .iter()
        .map(|(k, v)| format!("{k} {}", bytes(*v)))
        .collect();
    println!("weights     {} ({})", bytes(total_bytes), by.join(", "));
    println!(
        "state       {} per sequence (recurrent f32 {}, conv {})",
        bytes(s.recurrent_state_bytes + s.conv_state_bytes),
        bytes(s.recurrent_state_bytes),
        bytes(s.conv_state_bytes)
    );
    println!(
        "kv cache    {} per token (KV + MLA latent, bf16, all layers)",
        bytes(s.kv_bytes_per_token)
    );
    Ok(())
}
