//! `y = x Wᵀ` (W `[out, in]`, as stored by Hugging Face). One program per block of `BN` output
//! columns, looping over the rows inside: the block's weight rows stay in cache while every
//! row of x streams past them, and decode (few rows) still has `out / BN` programs to share
//! between threads. Inside, `RB × CB` register tiles: one pass over `in` accumulates the tile's
//! 16 dot products, so each loaded element feeds four multiply-adds; the reductions over `in`
//! are contiguous in both operands (vectorised by LLVM). Leftover rows and columns take
//! narrower tiles.
//!
//! Fusions (decided by `passes::fuse`): an RMSNorm of the input in the prologue (each program
//! computes `1/rms` of every row once, the norm weight is folded into the reduction) and a
//! residual add in the epilogue (`y = r + x Wᵀ`, written as the add's value).
//!
//! With tensor cores (`Ctx::tensor_cores`), a program is one tile of `y` instead (grid: column
//! blocks × row blocks), computed by one `Stmt::Mma` with bf16 operands and f32 accumulation;
//! the same fusions sit in its prologue and epilogue:
//! - prefill: [`PREFILL_MMA_ROWS`] × [`PREFILL_MMA_COLS`] tiles, and nothing in the program but
//!   the tile (a fused norm's `1/rms` per row comes from a small kernel of its own), so that a
//!   GPU runs each as one block of warps sharing operand slabs staged in shared memory;
//! - decode: [`MMA_ROWS`] × [`MMA_COLS`] tiles, one warp each, the depth split when the
//!   column blocks are too few programs ([`decode_k_splits`]).

use lamina_ir::graph::{NodeIndex, Op};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::{Dim, Expr, Stmt};

use super::{act, launch, Bind, Ctx, Launch, Phase, Value};

/// Output columns per program.
pub const BN: usize = 16;
/// Rows and columns of a decode program's tensor-core tile: 2 × 2 MMAs of 16 × 8, so decode
/// (one row block) has as many programs as the register-tile kernel.
pub const MMA_ROWS: usize = 32;
pub const MMA_COLS: usize = 16;
/// Rows and columns of a prefill program's tensor-core tile (a GPU block of 2 × 2 warps, each
/// 64 × 32), for depths of whole staging slabs ([`prefill_tile`]).
pub const PREFILL_MMA_ROWS: usize = 128;
pub const PREFILL_MMA_COLS: usize = 64;

/// The tensor-core tile of a prefill GEMM of depth `depth`: [`PREFILL_MMA_ROWS`] ×
/// [`PREFILL_MMA_COLS`] when the depth is a whole number of the GPU's staging slabs (the tile
/// then runs as a block-cooperative program), else the one-warp [`MMA_ROWS`] × [`MMA_COLS`].
pub fn prefill_tile(depth: usize) -> (usize, usize) {
    if depth.is_multiple_of(lamina_targets::mlir::lower::staged::SLAB) {
        (PREFILL_MMA_ROWS, PREFILL_MMA_COLS)
    } else {
        (MMA_ROWS, MMA_COLS)
    }
}
/// Register tile: rows × columns accumulated together.
pub const RB: usize = 4;
pub const CB: usize = 4;

/// The projection `n`; with `residual = Some(add)`, the add `add = r + n` in the epilogue.
pub fn build(cx: &Ctx, n: NodeIndex, residual: Option<NodeIndex>) -> Vec<Launch> {
    let g = cx.graph;
    let Op::Linear {
        weight,
        in_dim,
        out_dim,
    } = &g.node(n).op
    else {
        unreachable!("linear builder")
    };
    let root = residual.unwrap_or(n);
    let norm = cx.fusion.of(root).norm;
    let (k, nn) = (*in_dim, *out_dim);
    if cx.tensor_cores {
        return build_mma(cx, n, residual, weight, k, nn);
    }
    let bn = BN.min(nn);
    let blocks = nn.div_ceil(bn);
    let mut x_in = g.inputs(n)[0];
    let mut params = Vec::new();
    let mut body = vec![
        let_("n0", pid(0) * i(bn)),
        let_("nb", min(i(bn), i(nn) - v("n0"))),
    ];
    // x[r, k], times the norm weight when an RMSNorm is fused in.
    let mut x_at: Box<dyn Fn(Expr) -> Expr> = Box::new(|r| ld("x", [r, v("k")]));
    let mut name = format!("linear_{k}x{nn}");
    if let Some(nm) = norm {
        let fused = FusedNorm::of(cx, nm);
        x_in = fused.input;
        params.push(fused.param.clone());
        body.extend(fused.inv_rows(cx.rows, rows(), &|r| r, k));
        name = format!("{}_{name}", fused.prefix());
        x_at = Box::new(move |r| ld("x", [r, v("k")]) * fused.scale(v("k")));
    }
    let other = residual.map(|add| g.inputs(add).into_iter().find(|&x| x != n).unwrap_or(n));
    if let Some(o) = other {
        params.push((input("res", &act(nn)), Bind::Act(Value::Node(o))));
        name += "_residual";
    }
    // The value stored at y[r, c] from the dot product `acc`.
    let epilogue = |r: Expr, c: Expr, acc: Expr| -> Stmt {
        let mut y = acc;
        if norm.is_some() {
            y = y * ld("inv", [r.clone()]);
        }
        if other.is_some() {
            y = ld("res", [r.clone(), c.clone()]) + y;
        }
        st("y", [r, c], y)
    };
    let w_at = |c: Expr| ld("w", [c, v("k")]);
    let tile = |rs: &[Expr], cs: &[Expr]| register_tile(rs, cs, k, &*x_at, &w_at, &epilogue);
    let identity = |r: Expr| r;
    body.extend(col_tiles(v("n0"), v("nb"), &|cs: &[Expr]| {
        row_tiles(rows(), &identity, cs, &tile)
    }));
    params.insert(0, (input("x", &act(k)), Bind::Act(Value::Node(x_in))));
    params.insert(1, cx.weight("w", weight));
    params.push((output("y", &act(nn)), Bind::Act(Value::Node(root))));
    let mut nodes = vec![n];
    nodes.extend(norm);
    nodes.extend(residual);
    vec![launch(name, vec![Dim::N(blocks)], params, body, nodes, g)]
}

/// Warps a decode projection should launch before its depth is split (split-K): fewer leave
/// most of the GPU's memory parallelism unused at batch 1 (132 SMs).
pub const DECODE_WARPS: usize = 1024;
/// Least depth one split-K piece keeps (two MMA steps).
pub const MIN_SPLIT_DEPTH: usize = 32;
/// Depth granule of a split-K piece: one 64-byte bf16 slab, which a warp stages through shared
/// memory by `cp.async` (a piece of a whole number of slabs has its weights staged; any other
/// is loaded fragment by fragment).
pub const SPLIT_SLAB: usize = 32;
/// Depth granule of a piece when the depth is not a whole number of slabs: one MMA step.
const SPLIT_STEP: usize = 16;

/// Pieces the depth `k` of a decode projection with `programs` tile programs is split into:
/// the fewest that make [`DECODE_WARPS`] programs, or else the most there can be, each piece a
/// whole number of [`SPLIT_SLAB`]s (of MMA steps when `k` is not) and at least
/// [`MIN_SPLIT_DEPTH`] deep. E.g. 2304 = 72 slabs over 64 column blocks: 18 pieces of 128
/// (16 pieces of 144 would not stage).
pub fn decode_k_splits(programs: usize, k: usize) -> usize {
    let unit = if k.is_multiple_of(SPLIT_SLAB) {
        SPLIT_SLAB
    } else {
        SPLIT_STEP
    };
    if !k.is_multiple_of(unit) {
        return 1;
    }
    let units = k / unit;
    let mut best = 1;
    for s in 1..=units {
        if k / s < MIN_SPLIT_DEPTH {
            break;
        }
        if units.is_multiple_of(s) {
            best = s;
            if programs * s >= DECODE_WARPS {
                break;
            }
        }
    }
    best
}

/// Output columns per program of a decode GEMV on CUDA cores (the MoE experts' dot products)
/// over `cols` columns, with `per_block` programs per column block at batch 1: [`BN`], halved
/// while fewer than [`DECODE_WARPS`] programs would run. Each program's dot products are
/// sequential, so at batch 1 the number of programs is the kernel's memory parallelism.
pub fn decode_cols(per_block: usize, cols: usize) -> usize {
    let mut b = BN;
    while b > 1 && per_block * cols.div_ceil(b) < DECODE_WARPS {
        b /= 2;
    }
    b
}

/// The projection as one tensor-core tile per program: `y[r0 + i, n0 + j]` for the program's
/// row block `r0` and column block `n0`. In decode, when the column blocks alone are too few
/// programs, the depth is split into `S` pieces ([`decode_k_splits`]): each program sums one
/// piece into a partials buffer `[R, S·out]`, and a second kernel adds the pieces (and the
/// residual). In prefill, a fused norm's `1/rms` per row is computed by a kernel before the
/// first tile it feeds (`rms_inv`), which the tiles read as an input.
fn build_mma(
    cx: &Ctx,
    n: NodeIndex,
    residual: Option<NodeIndex>,
    weight: &str,
    k: usize,
    nn: usize,
) -> Vec<Launch> {
    let g = cx.graph;
    let root = residual.unwrap_or(n);
    let norm = cx.fusion.of(root).norm;
    let (tile_rows, tile_cols) = match cx.phase {
        Phase::Decode => (MMA_ROWS, MMA_COLS),
        Phase::Prefill => prefill_tile(k),
    };
    let blocks = nn.div_ceil(tile_cols);
    let splits = match cx.phase {
        Phase::Decode => decode_k_splits(blocks, k),
        Phase::Prefill => 1,
    };
    let ks = k / splits;
    let mut x_in = g.inputs(n)[0];
    let mut params = Vec::new();
    let mut launches = Vec::new();
    let mut body = vec![
        let_("n0", pid(0) * i(tile_cols)),
        let_("nb", min(i(tile_cols), i(nn) - v("n0"))),
        // Grid: column blocks, [pieces,] row blocks.
        let_("r0", pid(if splits > 1 { 2 } else { 1 }) * i(tile_rows)),
        let_("rb", min(i(tile_rows), rows() - v("r0"))),
    ];
    // The depth index of the tile's `k` (offset by the piece when split).
    let kg = if splits > 1 {
        body.push(let_("k0", pid(1) * i(ks)));
        v("k0") + v("k")
    } else {
        v("k")
    };
    let mut a = ld("x", [v("r0") + v("mi"), kg.clone()]);
    let mut name = format!("linear_mma_{k}x{nn}");
    let mut y = v("acc");
    if let Some(nm) = norm {
        let fused = FusedNorm::of(cx, nm);
        x_in = fused.input;
        params.push(fused.param.clone());
        // The normalised row is the operand (rounded to bf16 as an unfused norm's output
        // would be): x · w · 1/rms (of the whole row, also when the depth is split).
        name = format!("{}_{name}", fused.prefix());
        match cx.phase {
            Phase::Decode => {
                a = a * fused.scale(kg.clone()) * ld("inv", [v("mi")]);
                body.extend(fused.inv_rows(tile_rows, v("rb"), &|r| v("r0") + r, k));
            }
            Phase::Prefill => {
                // Once per norm, for every projection it feeds (q, k, v, ...).
                let (inv, new) = cx.norm_inv(nm);
                if new {
                    launches.push(fused.inv_kernel(cx, inv, k, nm));
                }
                params.push((input("inv", &act(1)), Bind::Act(inv)));
                a = a * fused.scale(kg.clone()) * ld("inv", [v("r0") + v("mi"), i(0)]);
            }
        }
    }
    let other = residual.map(|add| g.inputs(add).into_iter().find(|&x| x != n).unwrap_or(n));
    let mut nodes = vec![n];
    nodes.extend(norm);
    nodes.extend(residual);
    params.insert(0, (input("x", &act(k)), Bind::Act(Value::Node(x_in))));
    params.insert(1, cx.weight("w", weight));
    let b = ld("w", [v("n0") + v("mj"), kg]);
    if splits == 1 {
        if let Some(o) = other {
            params.push((input("res", &act(nn)), Bind::Act(Value::Node(o))));
            y = ld("res", [v("r0") + v("mi"), v("n0") + v("mj")]) + y;
            name += "_residual";
        }
        body.push(mma(
            [tile_rows, tile_cols, k],
            v("rb"),
            v("nb"),
            a,
            b,
            vec![st("y", [v("r0") + v("mi"), v("n0") + v("mj")], y)],
        ));
        params.push((output("y", &act(nn)), Bind::Act(Value::Node(root))));
        let grid = vec![Dim::N(blocks), Dim::RowBlocks(tile_rows)];
        launches.push(launch(name, grid, params, body, nodes, g));
        return launches;
    }

    // Split-K: partials, then their sum.
    let part = cx.temp(splits * nn);
    body.push(mma(
        [tile_rows, tile_cols, ks],
        v("rb"),
        v("nb"),
        a,
        b,
        vec![st(
            "part",
            [v("r0") + v("mi"), pid(1) * i(nn) + v("n0") + v("mj")],
            y,
        )],
    ));
    params.push((output("part", &act(splits * nn)), Bind::Act(part)));
    let grid = vec![Dim::N(blocks), Dim::N(splits), Dim::RowBlocks(tile_rows)];
    let partials = launch(
        format!("{name}_splitk{splits}"),
        grid,
        params,
        body,
        nodes.clone(),
        g,
    );
    let mut params = vec![(input("part", &act(splits * nn)), Bind::Act(part))];
    let mut total = sum(
        "s",
        i(0),
        i(splits),
        ld("part", [pid(0), v("s") * i(nn) + v("c")]),
    );
    let mut rname = format!("splitk_sum{splits}_{nn}");
    if let Some(o) = other {
        params.push((input("res", &act(nn)), Bind::Act(Value::Node(o))));
        total = ld("res", [pid(0), v("c")]) + total;
        rname += "_residual";
    }
    params.push((output("y", &act(nn)), Bind::Act(Value::Node(root))));
    let (grid, lo, hi) = super::elementwise::map_grid(nn);
    let sum_kernel = launch(
        rname,
        grid,
        params,
        vec![for_par("c", lo, hi, vec![st("y", [pid(0), v("c")], total)])],
        nodes,
        g,
    );
    vec![partials, sum_kernel]
}

/// An RMSNorm fused into a projection's prologue: its input, its weight parameter `nw`, and
/// the rows' `1/rms` computed into a local `inv`.
struct FusedNorm {
    input: NodeIndex,
    param: (lamina_ir::kernel::Param, Bind),
    eps: f64,
    zero_centred: bool,
}

impl FusedNorm {
    fn of(cx: &Ctx, nm: NodeIndex) -> FusedNorm {
        let Op::RmsNorm {
            weight,
            eps,
            zero_centred,
            ..
        } = &cx.graph.node(nm).op
        else {
            unreachable!("fuse: norm prologues are RMSNorms")
        };
        FusedNorm {
            input: cx.graph.inputs(nm)[0],
            param: cx.weight("nw", weight),
            eps: *eps,
            zero_centred: *zero_centred,
        }
    }

    /// The norm's scale of channel `k`: `nw[k]`, or `1 + nw[k]` zero-centred.
    fn scale(&self, k: Expr) -> Expr {
        if self.zero_centred {
            f(1.0) + ld("nw", [k])
        } else {
            ld("nw", [k])
        }
    }

    /// A local `inv[len]` and `inv[r] = 1/rms` of x row `row(r)` for `r < count`, over `depth`
    /// channels.
    fn inv_rows(
        &self,
        len: usize,
        count: Expr,
        row: &dyn Fn(Expr) -> Expr,
        depth: usize,
    ) -> Vec<Stmt> {
        let x_rk = || ld("x", [row(v("r")), v("k")]);
        vec![
            local("inv", len),
            for_(
                "r",
                i(0),
                count,
                vec![st(
                    "inv",
                    [v("r")],
                    rsqrt(
                        sum("k", i(0), i(depth), x_rk() * x_rk()) / f(depth as f64) + f(self.eps),
                    ),
                )],
            ),
        ]
    }

    /// A kernel writing `inv[r, 0] = 1/rms` of every row of the norm's input (one program per
    /// row): part of norm `nm`.
    fn inv_kernel(&self, cx: &Ctx, inv: Value, depth: usize, nm: NodeIndex) -> Launch {
        let x = || ld("x", [pid(0), v("k")]);
        let body = vec![st(
            "inv",
            [pid(0), i(0)],
            rsqrt(sum("k", i(0), i(depth), x() * x()) / f(depth as f64) + f(self.eps)),
        )];
        let params = vec![
            (input("x", &act(depth)), Bind::Act(Value::Node(self.input))),
            (output("inv", &act(1)), Bind::Act(inv)),
        ];
        launch(
            format!("rms_inv_{depth}"),
            vec![Dim::Rows],
            params,
            body,
            vec![nm],
            cx.graph,
        )
    }

    /// Kernel-name prefix: `rms_norm` or `rms_norm_zc`.
    fn prefix(&self) -> &'static str {
        if self.zero_centred {
            "rms_norm_zc"
        } else {
            "rms_norm"
        }
    }
}

/// `Σ_k x_at(r)·w_at(c)` for every (row, column) of an `rs × cs` register tile in one pass over
/// `k ∈ 0..kdim` (`x_at` and `w_at` read `k`), then `store(r, c, value)` for each: every loaded
/// element feeds `cs.len()` or `rs.len()` multiply-adds.
pub fn register_tile(
    rs: &[Expr],
    cs: &[Expr],
    kdim: usize,
    x_at: &dyn Fn(Expr) -> Expr,
    w_at: &dyn Fn(Expr) -> Expr,
    store: &dyn Fn(Expr, Expr, Expr) -> Stmt,
) -> Vec<Stmt> {
    let pairs: Vec<(usize, usize, String)> = (0..rs.len())
        .flat_map(|a| (0..cs.len()).map(move |b| (a, b, format!("acc{a}{b}"))))
        .collect();
    let mut loads = Vec::new();
    for (a, r) in rs.iter().enumerate() {
        loads.push(let_(&format!("x{a}"), x_at(r.clone())));
    }
    for (b, c) in cs.iter().enumerate() {
        loads.push(let_(&format!("w{b}"), w_at(c.clone())));
    }
    let carried = pairs.iter().map(|(_, _, n)| (n.as_str(), f(0.0))).collect();
    let yields = pairs
        .iter()
        .map(|(a, b, n)| v(n) + v(&format!("x{a}")) * v(&format!("w{b}")))
        .collect();
    // A split sum: a GPU spreads `k` over the lanes of a warp (coalesced weight rows).
    let mut out = vec![for_sum("k", i(0), i(kdim), carried, loads, yields)];
    for (a, b, n) in &pairs {
        out.push(store(rs[*a].clone(), cs[*b].clone(), v(n)));
    }
    out
}

/// Builds the statements of one register tile from its rows and columns.
pub type TileFn<'a> = dyn Fn(&[Expr], &[Expr]) -> Vec<Stmt> + 'a;

/// Rows `row_of(p)` for `p ∈ 0..n`, in tiles of [`RB`] (bound as `ra0..`) then one by one,
/// each tile handed to `tile` with the columns `cs`.
pub fn row_tiles(n: Expr, row_of: &dyn Fn(Expr) -> Expr, cs: &[Expr], tile: &TileFn) -> Vec<Stmt> {
    let mut head = vec![let_("p0", v("pb") * i(RB))];
    let mut rs = Vec::new();
    for a in 0..RB {
        let name = format!("ra{a}");
        head.push(let_(&name, row_of(v("p0") + i(a))));
        rs.push(v(&name));
    }
    vec![
        for_(
            "pb",
            i(0),
            n.clone() / i(RB),
            [head, tile(&rs, cs)].concat(),
        ),
        for_(
            "p",
            (n.clone() / i(RB)) * i(RB),
            n,
            [vec![let_("ra", row_of(v("p")))], tile(&[v("ra")], cs)].concat(),
        ),
    ]
}

/// Columns `n0 .. n0 + nb` in tiles of [`CB`] (bound as `cb0..`) then one by one.
pub fn col_tiles(n0: Expr, nb: Expr, body: &dyn Fn(&[Expr]) -> Vec<Stmt>) -> Vec<Stmt> {
    let mut head = vec![let_("c0", n0.clone() + v("jb") * i(CB))];
    let mut cs = Vec::new();
    for b in 0..CB {
        let name = format!("cb{b}");
        head.push(let_(&name, v("c0") + i(b)));
        cs.push(v(&name));
    }
    vec![
        for_("jb", i(0), nb.clone() / i(CB), [head, body(&cs)].concat()),
        for_(
            "j",
            (nb.clone() / i(CB)) * i(CB),
            nb,
            [vec![let_("c", n0 + v("j"))], body(&[v("c")])].concat(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_splits_keep_pieces_stageable() {
        // 2304 = 72 slabs: 64 column blocks need 16 pieces; 16 does not divide 72, 18 does.
        assert_eq!(decode_k_splits(64, 2304), 18);
        assert_eq!(2304 / 18 % SPLIT_SLAB, 0);
        // Powers of two where they divide: 4096 over 256 blocks, 1024 over 144.
        assert_eq!(decode_k_splits(256, 4096), 4);
        assert_eq!(decode_k_splits(144, 1024), 8);
        // Few blocks: as many pieces as there can be, none below MIN_SPLIT_DEPTH.
        assert_eq!(decode_k_splits(2, 2304), 72);
        assert_eq!(decode_k_splits(1, 64), 2);
        // Enough blocks already, or a depth that splits into no whole MMA steps.
        assert_eq!(decode_k_splits(2048, 2304), 1);
        assert_eq!(decode_k_splits(8, 40), 1);
        // Not a whole number of slabs: pieces of whole MMA steps (48 = 3 steps).
        assert_eq!(decode_k_splits(8, 48), 1);
        assert_eq!(decode_k_splits(8, 80), 1);
        assert_eq!(decode_k_splits(8, 112), 1);
        assert_eq!(decode_k_splits(8, 208), 1);
        assert_eq!(decode_k_splits(100, 240), 5);
    }
}
