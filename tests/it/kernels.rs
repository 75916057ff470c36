//! Recurrences against flash-linear-attention's naive kernels (`kernels/*.safetensors`), and
//! the chunked form (chunk 64, KDA sub-chunk 16) against the recurrent form.

use lamina_ir::graph::{Decay, Recurrence, Update};
use lamina_runtime::reference::chunked::{chunked_delta, CHUNK, SUB_CHUNK};
use lamina_runtime::reference::recurrence::{recurrent, Gate};
use lamina_runtime::reference::Real;
use rand::{Rng, SeedableRng};

use crate::common::{max_abs, oracle, read_all, rel_err, T};

struct Case {
    rec: Recurrence,
    b: usize,
    t: usize,
    tensors: std::collections::HashMap<String, T>,
}

fn load(name: &str) -> Case {
    let tensors = read_all(&oracle("kernels").join(format!("{name}.safetensors")));
    let q = &tensors["q"].shape;
    let (b, t, h, k) = (q[0], q[1], q[2], q[3]);
    let v = tensors["v"].shape[3];
    let kind = name.split('_').next().unwrap();
    let (update, decay, scale) = match kind {
        "gdn" => (Update::Delta, Decay::Scalar, (k as f64).powf(-0.5)),
        "kda" => (Update::Delta, Decay::PerChannel, (k as f64).powf(-0.5)),
        "simple" => (Update::Additive, Decay::Scalar, (k as f64).powf(-0.5)),
        "lightning" => (Update::Additive, Decay::Scalar, 1.0),
        _ => panic!("unknown kernel case {name}"),
    };
    Case {
        rec: Recurrence {
            heads: h,
            key_heads: h,
            dk: k,
            dv: v,
            update,
            decay,
            scale,
        },
        b,
        t,
        tensors,
    }
}

fn cast<F: Real>(v: &[f64]) -> Vec<F> {
    v.iter().map(|&x| F::of(x)).collect()
}

/// Runs every batch entry; returns (o, ht) flattened like the fixtures.
fn run_case<F: Real>(c: &Case, chunked: bool) -> (Vec<f64>, Vec<f64>) {
    let r = &c.rec;
    let per = |name: &str| c.tensors.get(name).map(|t| t.data.len() / c.b);
    let (mut o_all, mut h_all) = (Vec::new(), Vec::new());
    for bi in 0..c.b {
        let slice = |name: &str| -> Option<Vec<F>> {
            let n = per(name)?;
            Some(cast(&c.tensors[name].data[bi * n..(bi + 1) * n]))
        };
        let (q, k, v) = (
            slice("q").unwrap(),
            slice("k").unwrap(),
            slice("v").unwrap(),
        );
        let g = slice("g").unwrap();
        let beta = slice("beta");
        let mut state = slice("h0").unwrap_or_else(|| vec![F::zero(); r.heads * r.dk * r.dv]);
        let gate = match r.decay {
            Decay::PerChannel => Gate::PerChannel(&g),
            _ => Gate::Scalar(&g),
        };
        let o = if chunked {
            chunked_delta(
                r,
                c.t,
                &q,
                &k,
                &v,
                gate,
                beta.as_deref().unwrap(),
                &mut state,
                CHUNK,
                SUB_CHUNK,
            )
        } else {
            recurrent(r, c.t, &q, &k, &v, gate, beta.as_deref(), &mut state)
        };
        o_all.extend(o.iter().map(|x| x.to_f64().unwrap()));
        h_all.extend(state.iter().map(|x| x.to_f64().unwrap()));
    }
    (o_all, h_all)
}

const CASES: &[&str] = &[
    "gdn_T100_K64",
    "gdn_T300_K32_h0",
    "kda_T100_K32",
    "kda_T300_K32_h0",
    "simple_gla_T100_K32_h0",
    "lightning_T300_K32",
];

#[test]
fn recurrent_form_matches_fla_naive_kernels() {
    for name in CASES {
        let c = load(name);
        let (o_ref, h_ref) = (&c.tensors["o_ref_f64"].data, &c.tensors["ht_ref_f64"].data);
        let (o64, h64) = run_case::<f64>(&c, false);
        let (o32, h32) = run_case::<f32>(&c, false);
        let (eo, eh) = (rel_err(&o64, o_ref), rel_err(&h64, h_ref));
        let (ao, ah) = (max_abs(&o32, o_ref), max_abs(&h32, h_ref));
        println!("kernel {name:<24} recurrent f64 rel err o {eo:.1e} ht {eh:.1e} | f32 max-abs o {ao:.1e} ht {ah:.1e}");
        assert!(eo < 1e-12 && eh < 1e-12, "{name}: f64 {eo:e} {eh:e}");
        let tol = if name.starts_with("lightning") {
            2e-4
        } else {
            1e-5
        };
        assert!(ao < tol && ah < tol, "{name}: f32 {ao:e} {ah:e}");
    }
}

#[test]
fn chunked_form_matches_fla_naive_kernels() {
    for name in CASES
        .iter()
        .filter(|n| n.starts_with("gdn") || n.starts_with("kda"))
    {
        let c = load(name);
        let (o_ref, h_ref) = (&c.tensors["o_ref_f64"].data, &c.tensors["ht_ref_f64"].data);
        let (o64, h64) = run_case::<f64>(&c, true);
        let (o32, h32) = run_case::<f32>(&c, true);
        let (eo, eh) = (rel_err(&o64, o_ref), rel_err(&h64, h_ref));
        let (ao, ah) = (max_abs(&o32, o_ref), max_abs(&h32, h_ref));
        println!("kernel {name:<24} chunked   f64 rel err o {eo:.1e} ht {eh:.1e} | f32 max-abs o {ao:.1e} ht {ah:.1e}");
        assert!(eo < 1e-12 && eh < 1e-12, "{name}: f64 {eo:e} {eh:e}");
        assert!(ao < 1e-5 && ah < 1e-5, "{name}: f32 {ao:e} {ah:e}");
    }
}

/// Fresh random shapes: T not a multiple of the chunk, GQA-style key-head sharing, strong and
/// weak decay, with and without an initial state; chunked f32 against recurrent f64.
#[test]
fn chunked_matches_recurrent_on_random_shapes() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for (t, hk, h, dk, dv, decay) in [
        (1, 1, 1, 8, 8, Decay::Scalar),
        (63, 2, 4, 16, 8, Decay::Scalar),
        (65, 1, 2, 16, 32, Decay::PerChannel),
        (130, 2, 2, 32, 16, Decay::PerChannel),
        (200, 1, 3, 8, 8, Decay::None),
        (17, 2, 2, 16, 16, Decay::PerChannel),
    ] {
        let rec = Recurrence {
            heads: h,
            key_heads: hk,
            dk,
            dv,
            update: Update::Delta,
            decay,
            scale: (dk as f64).powf(-0.5),
        };
        let unit = |rng: &mut rand_chacha::ChaCha8Rng, n: usize, d: usize| -> Vec<f64> {
            let mut v: Vec<f64> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
            for row in v.chunks_mut(d) {
                let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
                row.iter_mut().for_each(|x| *x /= norm);
            }
            v
        };
        let q = unit(&mut rng, t * hk, dk);
        let k = unit(&mut rng, t * hk, dk);
        let v: Vec<f64> = (0..t * h * dv)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let gw = if decay == Decay::PerChannel { dk } else { 1 };
        // Log-decays down to −7: per-channel products over a chunk underflow without the
        // sub-chunk rescaling.
        let g: Vec<f64> = (0..t * h * gw)
            .map(|_| -(rng.random_range((1e-3f64).ln()..(7.0f64).ln())).exp())
            .collect();
        let beta: Vec<f64> = (0..t * h).map(|_| rng.random_range(0.05..0.95)).collect();
        let h0: Vec<f64> = (0..h * dk * dv)
            .map(|_| rng.random_range(-0.5..0.5))
            .collect();
        fn mk(decay: Decay, g: &[f64]) -> Gate<'_, f64> {
            match decay {
                Decay::PerChannel => Gate::PerChannel(g),
                Decay::Scalar => Gate::Scalar(g),
                _ => Gate::None,
            }
        }
        let mut s_ref = h0.clone();
        let o_ref = recurrent(&rec, t, &q, &k, &v, mk(decay, &g), Some(&beta), &mut s_ref);
        let c32 = |x: &[f64]| cast::<f32>(x);
        let g32 = c32(&g);
        let gate32 = match decay {
            Decay::PerChannel => Gate::PerChannel(&g32[..]),
            Decay::Scalar => Gate::Scalar(&g32[..]),
            _ => Gate::None,
        };
        let mut s32 = c32(&h0);
        let o32 = chunked_delta(
            &rec,
            t,
            &c32(&q),
            &c32(&k),
            &c32(&v),
            gate32,
            &c32(&beta),
            &mut s32,
            CHUNK,
            SUB_CHUNK,
        );
        let o32: Vec<f64> = o32.iter().map(|&x| x as f64).collect();
        let s32: Vec<f64> = s32.iter().map(|&x| x as f64).collect();
        let (eo, es) = (rel_err(&o32, &o_ref), rel_err(&s32, &s_ref));
        assert!(
            eo < 1e-5 && es < 1e-5,
            "T={t} decay={decay:?}: chunked f32 vs recurrent f64 rel err o {eo:e} S {es:e}"
        );
        let mut s64 = h0.clone();
        let o64 = chunked_delta(
            &rec,
            t,
            &q,
            &k,
            &v,
            mk(decay, &g),
            &beta,
            &mut s64,
            CHUNK,
            SUB_CHUNK,
        );
        assert!(
            rel_err(&o64, &o_ref) < 1e-12 && rel_err(&s64, &s_ref) < 1e-12,
            "T={t}: chunked f64"
        );
    }
}
