//! `fuse-siblings`: horizontal fusion. Independent launches that read the same activation
//! (the q, k, v, gate and beta projections of one normed input; an FFN's gate and up
//! projections; an MoE router and its shared expert's projections) become one launch of one
//! kernel whose programs are the members' programs side by side.
//!
//! The fused kernel's grid is `[Σ programs of the members' constant axes, the row axes]` (or
//! the row axes first, when the members' come first): the members' row axes (`R`, `⌈R / b⌉`)
//! must agree and stay as they are; their constant axes are laid end to end along one axis,
//! `pid0` say. Member `m` runs in the programs `off_m ≤ pid0 < off_m + P_m`
//! (`if pid0 ≥ off_m { if pid0 < off_m + P_m { ... } }`), its own program ids recomputed from
//! `pid0 − off_m` (its last axis fastest, as the GPU numbers programs, so its programs keep
//! their order) in `let`s named `_m<m>_pid<axis>`. No
//! program is idle: unlike a grid padded to the largest member, a fused launch of a
//! `4096 × 2304` and a `32 × 2304` projection has exactly their programs.
//!
//! A launch joins a group led by an earlier launch when:
//! - it reads an activation the leader reads, or runs the same kernel (the split-K sums and
//!   second projections of a KDA layer's forget and output gates);
//! - it commutes with every launch from the leader up to it (no buffer one writes and the
//!   other reads or writes), so it may run at the leader's place, concurrently with the group;
//! - its program is of the same kind (a thread, or a warp, never a block-cooperative tile or
//!   attention block: `lamina_targets::nvptx::lanes`), and the fused kernel keeps every
//!   member's layout on both GPU targets (warps per block, where the locals live, MMA staging);
//! - its row axes equal the leader's.
//!
//! Parameters bound to the same buffer with the same type and read-only are shared; the others
//! keep their names, suffixed `_<m>` when taken. Locals of the same name and size are shared
//! (one member runs per program), others renamed. Every member computes exactly what its own
//! launch did, so plans with and without this pass agree bit for bit (`compiled::` tests).
//!
//! At batch-1 decode, where each launch is a few microseconds of launch and drain on a GPU,
//! this takes Kimi-Linear-48B's decode step from 625 launches to fewer than 480.

use std::collections::{BTreeSet, HashMap};

use lamina_ir::kernel::build::{ge, i, lt, pid, rem};
use lamina_ir::kernel::verify::verify_kernel;
use lamina_ir::kernel::{Access, Dim, Elem, Expr, Kernel, Param, Stmt};
use lamina_ir::Error;
use lamina_targets::nvptx;
use lamina_targets::Target;

use super::{Pass, Program};
use crate::kernels::{Bind, Launch};

/// Most launches fused into one.
pub const MAX_MEMBERS: usize = 8;
/// How far after a leader (in launches) a sibling is looked for.
pub const WINDOW: usize = 16;

pub struct FuseSiblings;

impl Pass for FuseSiblings {
    fn name(&self) -> &'static str {
        "fuse-siblings"
    }

    fn run(&self, p: &mut Program) -> Result<(), Error> {
        // Debug builds that keep every value keep one launch per node too.
        if p.options.keep_values {
            return Ok(());
        }
        for launches in p.schedules.values_mut() {
            fuse_siblings(launches);
        }
        Ok(())
    }
}

/// Fuses the sibling groups of one launch list, each at its leader's place.
pub fn fuse_siblings(launches: &mut Vec<Launch>) {
    let mut i = 0;
    while i < launches.len() {
        if let Some((members, fused)) = group(launches, i) {
            for &j in members[1..].iter().rev() {
                launches.remove(j);
            }
            launches[i] = fused;
        }
        i += 1;
    }
}

/// How a kernel's programs map to threads (`nvptx::lanes`): only programs of one kind share a
/// kernel.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Thread,
    Warp,
}

fn kind(k: &Kernel) -> Option<Kind> {
    // Attention blocks a GPU runs as loops declare locals of their own (`expand::attend_loops`).
    fn attends(b: &[Stmt]) -> bool {
        b.iter().any(|s| match s {
            Stmt::Attend(_) => true,
            Stmt::For { body, .. } | Stmt::If { then: body, .. } => attends(body),
            _ => false,
        })
    }
    if nvptx::block_program(k) || attends(&k.body) {
        return None;
    }
    match nvptx::lanes(k) {
        1 => Some(Kind::Thread),
        nvptx::WARP => Some(Kind::Warp),
        _ => None,
    }
}

/// Whether an axis depends on the rows.
fn row_axis(d: &Dim) -> bool {
    matches!(d, Dim::Rows | Dim::RowBlocks(_))
}

fn row_axes(k: &Kernel) -> Vec<Dim> {
    k.grid.iter().copied().filter(row_axis).collect()
}

/// Whether the row axes come first (`grid(R, 8)`: consecutive programs are a row's column
/// blocks) rather than last (`grid(256, 4, ⌈R/32⌉)`, or only rows, or none); `None` when they
/// lie between constant axes. The GPU numbers programs with the last axis fastest: the fused
/// grid keeps each member's order.
fn rows_first(k: &Kernel) -> Option<bool> {
    let rows = k.grid.iter().filter(|d| row_axis(d)).count();
    let n = k.grid.len();
    if rows == 0 || rows == n || k.grid[n - rows..].iter().all(row_axis) {
        Some(false)
    } else if k.grid[..rows].iter().all(row_axis) {
        Some(true)
    } else {
        None
    }
}

/// Programs along the constant axes.
fn constant_programs(k: &Kernel) -> usize {
    k.grid
        .iter()
        .filter(|d| !row_axis(d))
        .map(|d| d.eval(0))
        .product()
}

/// The buffers launch `l` reads and writes.
fn accesses(l: &Launch) -> (Vec<&Bind>, Vec<&Bind>) {
    let (mut reads, mut writes) = (Vec::new(), Vec::new());
    for (p, b) in l.kernel.params.iter().zip(&l.args) {
        if p.access != Access::Write {
            reads.push(b);
        }
        if p.access != Access::Read {
            writes.push(b);
        }
    }
    (reads, writes)
}

/// Whether `a` and `b` may run in either order, or at once: neither writes what the other
/// reads or writes.
fn commute(a: &Launch, b: &Launch) -> bool {
    let (ra, wa) = accesses(a);
    let (rb, wb) = accesses(b);
    !wa.iter().any(|x| rb.contains(x) || wb.contains(x)) && !wb.iter().any(|x| ra.contains(x))
}

/// The group led by launch `i` (its indices, `i` first) and its fused launch, when at least one
/// sibling joins.
fn group(launches: &[Launch], i: usize) -> Option<(Vec<usize>, Launch)> {
    let leader = &launches[i];
    let lead_kind = kind(&leader.kernel)?;
    let rows = row_axes(&leader.kernel);
    let (lead_reads, _) = accesses(leader);
    let shared: Vec<&Bind> = lead_reads
        .into_iter()
        .filter(|b| matches!(b, Bind::Act(_)))
        .collect();
    let mut members = vec![i];
    let mut fused: Option<Launch> = None;
    for j in i + 1..launches.len().min(i + 1 + WINDOW) {
        if members.len() == MAX_MEMBERS {
            break;
        }
        let l = &launches[j];
        let same_kernel = || {
            l.kernel.name == leader.kernel.name && l.kernel.signature() == leader.kernel.signature()
        };
        let sibling = kind(&l.kernel) == Some(lead_kind)
            && row_axes(&l.kernel) == rows
            && rows_first(&l.kernel).is_some()
            && rows_first(&l.kernel) == rows_first(&leader.kernel)
            && (accesses(l).0.iter().any(|b| shared.contains(b)) || same_kernel())
            && launches[i..j].iter().all(|x| commute(x, l));
        if !sibling {
            continue;
        }
        let mut with: Vec<&Launch> = members.iter().map(|&m| &launches[m]).collect();
        with.push(l);
        if let Some(f) = fuse(&with).filter(|f| keeps_layouts(&f.kernel, &with, lead_kind)) {
            members.push(j);
            fused = Some(f);
        }
    }
    fused.map(|f| (members, f))
}

/// Whether the fused kernel is of the members' kind, keeps each member's layout on both GPU
/// targets (warps per block and program, where the locals live, at least its MMA staging), and
/// has the locals of its largest member, give or take 1 KiB (locals of one name and size are
/// shared: a program runs one member; more would grow every program's scratch or stack).
fn keeps_layouts(fused: &Kernel, members: &[&Launch], k: Kind) -> bool {
    if kind(fused) != Some(k) {
        return false;
    }
    let bytes = |k: &Kernel| lamina_targets::mlir::lower::local_layout(k).1;
    let largest = members.iter().map(|m| bytes(&m.kernel)).max().unwrap_or(0);
    if bytes(fused) > largest + 1024 {
        return false;
    }
    [Target::Sm80, Target::Sm90a].into_iter().all(|t| {
        let f = nvptx::warp_layout(fused, t);
        members
            .iter()
            .all(|m| match (f, nvptx::warp_layout(&m.kernel, t)) {
                (None, None) => true,
                (Some(f), Some(m)) => {
                    f.warps == m.warps
                        && f.program_warps == m.program_warps
                        && f.locals == m.locals
                        && f.staging >= m.staging
                }
                _ => false,
            })
    })
}

/// One launch running `members`' programs side by side (see the module docs); `None` when the
/// result does not verify.
fn fuse(members: &[&Launch]) -> Option<Launch> {
    let rows = row_axes(&members[0].kernel);
    // The axis of the members' programs laid end to end: before the row axes, or after them
    // when they come first.
    let flat = match rows_first(&members[0].kernel)? {
        true => rows.len(),
        false => 0,
    };
    let row_pid = |r: usize| if flat == 0 { r + 1 } else { r };
    let mut params: Vec<Param> = Vec::new();
    let mut args: Vec<Bind> = Vec::new();
    // Locals declared so far: name → (elem, len).
    let mut locals: HashMap<String, (Elem, usize)> = HashMap::new();
    let mut body = Vec::new();
    let total: usize = members.iter().map(|m| constant_programs(&m.kernel)).sum();
    let mut off = 0;
    for (m, launch) in members.iter().enumerate() {
        let k = &launch.kernel;
        let text = format!("{k:?}");
        let mut names: HashMap<String, String> = HashMap::new();
        for (p, b) in k.params.iter().zip(&launch.args) {
            let same = params.iter().zip(&args).find(|(q, c)| {
                *c == b
                    && q.elem == p.elem
                    && q.shape == p.shape
                    && q.access == Access::Read
                    && p.access == Access::Read
            });
            let name = match same {
                Some((q, _)) => q.name.clone(),
                None => {
                    let name = fresh(&p.name, m, |n| {
                        params.iter().any(|q| q.name == n) || locals.contains_key(n)
                    });
                    params.push(Param {
                        name: name.clone(),
                        ..p.clone()
                    });
                    args.push(b.clone());
                    name
                }
            };
            names.insert(p.name.clone(), name);
        }
        let mut declared = Vec::new();
        collect_locals(&k.body, &mut declared);
        for (name, elem, len) in declared {
            let new = match locals.get(&name) {
                Some(&(e, l)) if (e, l) == (elem, len) => name.clone(),
                None if !params.iter().any(|q| q.name == name) => name.clone(),
                _ => fresh(&name, m, |n| {
                    params.iter().any(|q| q.name == n) || locals.contains_key(n)
                }),
            };
            locals.insert(new.clone(), (elem, len));
            names.insert(name, new);
        }
        // The member's program ids: its constant axes from `pid_flat − off` (its last axis
        // fastest, as the GPU numbers programs), its row axes the fused kernel's.
        let at = match off {
            0 => pid(flat),
            _ => pid(flat) - i(off),
        };
        let all = constant_programs(k);
        let mut lets = Vec::new();
        let mut pids: Vec<Expr> = vec![Expr::I(0); k.grid.len()];
        let (mut stride, mut row) = (1usize, k.grid.iter().filter(|d| row_axis(d)).count());
        for (axis, d) in k.grid.iter().enumerate().rev() {
            if row_axis(d) {
                row -= 1;
                pids[axis] = Expr::Pid(row_pid(row));
                continue;
            }
            let n = d.eval(0);
            let value = match (stride, n) {
                (_, 1) => i(0),
                (1, _) if n == all => at.clone(),
                (1, _) => rem(at.clone(), i(n)),
                _ if stride * n == all => at.clone() / i(stride),
                _ => rem(at.clone() / i(stride), i(n)),
            };
            stride *= n;
            let name = format!("_m{m}_pid{axis}");
            if text.contains(&format!("{name:?}")) {
                return None;
            }
            lets.insert(0, Stmt::Let(name.clone(), value));
            pids[axis] = Expr::Var(name);
        }
        let rename = |n: &str| names.get(n).cloned().unwrap_or_else(|| n.to_string());
        let mut f = |e: &Expr| rewrite(e, &pids, &rename);
        let mut then = lets;
        then.extend(k.body.iter().map(|s| s.rewrite(&mut f, &rename)));
        if off + all < total {
            then = vec![Stmt::If {
                cond: lt(pid(flat), i(off + all)),
                then,
            }];
        }
        if off > 0 {
            then = vec![Stmt::If {
                cond: ge(pid(flat), i(off)),
                then,
            }];
        }
        body.extend(then);
        off += all;
    }
    let mut grid = rows;
    grid.insert(flat, Dim::N(total));
    let mut nodes: Vec<String> = Vec::new();
    let mut graph_nodes = Vec::new();
    for l in members {
        for n in &l.kernel.nodes {
            if !nodes.contains(n) {
                nodes.push(n.clone());
            }
        }
        for n in &l.nodes {
            if !graph_nodes.contains(n) {
                graph_nodes.push(*n);
            }
        }
    }
    let kernel = Kernel {
        name: name(members),
        nodes,
        grid,
        params,
        body,
    };
    verify_kernel(&kernel).ok()?;
    Some(Launch {
        kernel,
        args,
        nodes: graph_nodes,
    })
}

/// `<name>_x<n>` for a group of one kernel, else `group<n>_<leader's name>`.
fn name(members: &[&Launch]) -> String {
    let first = &members[0].kernel;
    let names: BTreeSet<&str> = members.iter().map(|m| m.kernel.name.as_str()).collect();
    if names.len() == 1 {
        format!("{}_x{}", first.name, members.len())
    } else {
        format!("group{}_{}", members.len(), first.name)
    }
}

/// `base` if `taken` says it is free, else `base_<m>` (`base_<m>_2`, ...).
fn fresh(base: &str, m: usize, taken: impl Fn(&str) -> bool) -> String {
    if !taken(base) {
        return base.to_string();
    }
    let mut name = format!("{base}_{m}");
    let mut n = 2;
    while taken(&name) {
        name = format!("{base}_{m}_{n}");
        n += 1;
    }
    name
}

/// `e` with program ids replaced by `pids` and loaded buffers renamed.
fn rewrite(e: &Expr, pids: &[Expr], rename: &dyn Fn(&str) -> String) -> Expr {
    match e {
        Expr::Pid(a) => pids[*a].clone(),
        Expr::Load(b, idx) => Expr::Load(
            rename(b),
            idx.iter().map(|i| rewrite(i, pids, rename)).collect(),
        ),
        _ => e.map_children(&mut |c| rewrite(c, pids, rename)),
    }
}

/// Every local declared in `b`: name, element, length.
fn collect_locals(b: &[Stmt], out: &mut Vec<(String, Elem, usize)>) {
    for s in b {
        match s {
            Stmt::Local { name, elem, len } => {
                if !out.iter().any(|(n, ..)| n == name) {
                    out.push((name.clone(), *elem, *len));
                }
            }
            Stmt::For { body, .. } | Stmt::If { then: body, .. } => collect_locals(body, out),
            Stmt::Mma(m) => collect_locals(&m.epilogue, out),
            Stmt::Attend(a) => collect_locals(&a.epilogue, out),
            Stmt::Let(..) | Stmt::Store { .. } | Stmt::Tile(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Value;
    use lamina_ir::kernel::build::*;
    use lamina_ir::kernel::count::launch_work;

    fn act(t: usize) -> Bind {
        Bind::Act(Value::Temp(t, 8))
    }

    /// `y[r, c] = Σ_k x[r, k]·w[c, k]` for the 8 columns `c` of program `(pid0, pid1)` (a
    /// `4 × cols` weight, column blocks along pid0, two depth halves along pid1 adding into
    /// separate outputs), rows along `pid2` in blocks of 2: a warp program (its sums are split).
    fn gemv(cols: usize, x: usize, y: usize) -> Launch {
        let k = Kernel {
            name: format!("gemv_{cols}"),
            nodes: vec![],
            grid: vec![Dim::N(cols / 8), Dim::N(2), Dim::RowBlocks(2)],
            params: vec![
                input("x", &[Dim::Rows, Dim::N(4)]),
                input("w", &[Dim::N(cols), Dim::N(4)]),
                output("y", &[Dim::Rows, Dim::N(2 * cols)]),
            ],
            body: vec![
                let_("c0", pid(0) * i(8)),
                let_("k0", pid(1) * i(2)),
                for_(
                    "r",
                    pid(2) * i(2),
                    min(pid(2) * i(2) + i(2), rows()),
                    vec![for_(
                        "c",
                        i(0),
                        i(8),
                        vec![st(
                            "y",
                            [v("r"), pid(1) * i(cols) + v("c0") + v("c")],
                            sum(
                                "k",
                                v("k0"),
                                v("k0") + i(2),
                                ld("x", [v("r"), v("k")]) * ld("w", [v("c0") + v("c"), v("k")]),
                            ),
                        )],
                    )],
                ),
            ],
        };
        Launch {
            args: vec![act(x), Bind::Weight(format!("w{cols}")), act(y)],
            kernel: k,
            nodes: vec![],
        }
    }

    #[test]
    fn siblings_of_one_input_run_side_by_side() {
        let (a, b) = (gemv(16, 0, 1), gemv(32, 0, 2));
        let (p, q) = (a.kernel.programs(5), b.kernel.programs(5));
        let (members, fused) = group(&[a.clone(), b.clone()], 0).expect("a group");
        assert_eq!(members, [0, 1]);
        let k = &fused.kernel;
        assert_eq!(k.name, "group2_gemv_16");
        // Programs end to end along pid0, the row blocks kept.
        assert_eq!(k.grid, [Dim::N(2 * 2 + 4 * 2), Dim::RowBlocks(2)]);
        assert_eq!(k.programs(5), p + q);
        // The shared input is one parameter; the others keep their names, suffixed when taken.
        let names: Vec<&str> = k.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["x", "w", "y", "w_1", "y_1"]);
        assert_eq!(
            fused.args,
            [act(0), a.args[1].clone(), act(1), b.args[1].clone(), act(2)]
        );
        // Member 1's program ids from pid0 − 4, its last axis fastest (as the GPU numbers
        // programs: each member's keep their order).
        let text = lamina_ir::kernel::print::print_kernel(k);
        assert!(text.contains("let _m1_pid0 = ((pid0 - 4) / 2)"), "{text}");
        assert!(text.contains("let _m1_pid1 = ((pid0 - 4) % 2)"), "{text}");
        assert!(text.contains("let _m0_pid0 = (pid0 / 2)"), "{text}");
        // The cost model counts each member's programs once: the fused launch costs what the
        // two did.
        for rows in [1, 5] {
            let (wa, wb, wf) = (
                launch_work(&a.kernel, rows, (0.0, 1.0)),
                launch_work(&b.kernel, rows, (0.0, 1.0)),
                launch_work(k, rows, (0.0, 1.0)),
            );
            assert!((wf.flops - wa.flops - wb.flops).abs() < 1e-6, "{rows}");
            assert!((wf.load_bytes - wa.load_bytes - wb.load_bytes).abs() < 1e-6);
            assert!((wf.store_bytes - wa.store_bytes - wb.store_bytes).abs() < 1e-6);
        }
    }

    #[test]
    fn only_commuting_launches_join() {
        // b reads what a writes: no group.
        let (a, b) = (gemv(16, 0, 1), gemv(16, 1, 2));
        assert!(group(&[a.clone(), b], 0).is_none());
        // c reads what the launch between writes: it stays after it; d moves past it.
        let between = gemv(16, 1, 3);
        let c = gemv(32, 3, 4);
        let d = gemv(32, 0, 5);
        let (members, _) = group(&[a.clone(), between, c, d], 0).unwrap();
        assert_eq!(members, [0, 3]);
        // e overwrites what the launch between reads: it may not run before it.
        let e = gemv(32, 0, 1);
        assert!(group(&[gemv(16, 0, 6), gemv(8, 1, 3), e], 0).is_none());
        // The same kernel with no input in common joins too (independent split-K sums).
        let (members, fused) = group(&[a, gemv(16, 7, 8)], 0).unwrap();
        assert_eq!(members, [0, 1]);
        assert_eq!(fused.kernel.name, "gemv_16_x2");
    }

    #[test]
    fn programs_of_different_kinds_stay_apart() {
        // A thread program (no reduction, no split loop) does not join a warp program.
        let mut t = gemv(16, 0, 9);
        t.kernel.body = vec![st("y", [pid(2), pid(0)], ld("x", [pid(2), i(0)]))];
        assert!(group(&[gemv(16, 0, 1), t.clone()], 0).is_none());
        // Nor one with other row axes.
        let mut rows = gemv(32, 0, 2);
        rows.kernel.grid[2] = Dim::Rows;
        assert!(group(&[gemv(16, 0, 1), rows], 0).is_none());
    }

    /// Row axes that come first stay first: the members' programs are laid end to end along
    /// the last axis, consecutive programs a row's column blocks as before.
    #[test]
    fn rows_first_grids_keep_their_order() {
        let row_major = |cols: usize, x: usize, y: usize| {
            let mut l = gemv(cols, x, y);
            l.kernel.grid = vec![Dim::Rows, Dim::N(cols / 8)];
            l.kernel.body = vec![for_par(
                "c",
                pid(1) * i(8),
                pid(1) * i(8) + i(8),
                vec![st(
                    "y",
                    [pid(0), v("c")],
                    ld("x", [pid(0), rem(v("c"), i(4))]),
                )],
            )];
            l
        };
        let (_, fused) = group(&[row_major(16, 0, 1), row_major(32, 0, 2)], 0).unwrap();
        let k = &fused.kernel;
        assert_eq!(k.grid, [Dim::Rows, Dim::N(2 + 4)]);
        let text = lamina_ir::kernel::print::print_kernel(k);
        assert!(text.contains("if (pid1 >= 2)"), "{text}");
        assert!(text.contains("let _m1_pid1 = (pid1 - 2)"), "{text}");
        assert!(text.contains("y_1[pid0, c]"), "{text}");
        // Row axes between constant axes: no fusion.
        let mut mid = gemv(16, 0, 1);
        mid.kernel.grid = vec![Dim::N(2), Dim::RowBlocks(2), Dim::N(2)];
        assert!(group(&[mid.clone(), mid], 0).is_none());
    }

    /// A member's locals are not added to every program of a larger member: a fused kernel
    /// with more locals than its largest member (beyond 1 KiB) is not made.
    #[test]
    fn locals_do_not_grow() {
        let with_local = |name: &str, len: usize, x: usize, y: usize| {
            let mut l = gemv(16, x, y);
            l.kernel.body.insert(0, local(name, len));
            l.kernel.body.push(st(name, [i(0)], f(0.0)));
            l
        };
        // The same local in both: shared.
        assert!(group(
            &[with_local("t", 4096, 0, 1), with_local("t", 4096, 0, 2)],
            0
        )
        .is_some());
        // Two different 4 KiB locals: 8 KiB a program, not fused.
        assert!(group(
            &[with_local("t", 1024, 0, 1), with_local("u", 1024, 0, 2)],
            0
        )
        .is_none());
    }

    #[test]
    fn the_pass_moves_members_to_the_leader() {
        let mut launches = vec![
            gemv(16, 0, 1),
            gemv(16, 1, 3),
            gemv(32, 0, 2),
            gemv(8, 3, 4),
        ];
        fuse_siblings(&mut launches);
        let names: Vec<&str> = launches.iter().map(|l| l.kernel.name.as_str()).collect();
        assert_eq!(names, ["group2_gemv_16", "gemv_16", "gemv_8"]);
    }
}
