//! `dedupe-kernels`: launches whose kernels have the same signature (grid, parameters, body)
//! share one kernel; different kernels that a builder happened to name alike get distinct
//! names (`_1`, `_2`, ...).

use std::collections::HashMap;

use lamina_ir::Error;

use super::{Pass, Program};

pub struct DedupeKernels;

impl Pass for DedupeKernels {
    fn name(&self) -> &'static str {
        "dedupe-kernels"
    }

    fn run(&self, p: &mut Program) -> Result<(), Error> {
        // signature → final name; base name → how many distinct kernels use it.
        let mut by_sig: HashMap<String, String> = HashMap::new();
        let mut used: HashMap<String, usize> = HashMap::new();
        for launches in p.schedules.values_mut() {
            for l in launches.iter_mut() {
                let sig = l.kernel.signature();
                let name = match by_sig.get(&sig) {
                    Some(n) => n.clone(),
                    None => {
                        let count = used.entry(l.kernel.name.clone()).or_insert(0);
                        let n = if *count == 0 {
                            l.kernel.name.clone()
                        } else {
                            format!("{}_{count}", l.kernel.name)
                        };
                        *count += 1;
                        by_sig.insert(sig, n.clone());
                        n
                    }
                };
                l.kernel.name = name;
            }
        }
        // Shared kernels list every node they compute.
        let mut nodes: HashMap<String, Vec<String>> = HashMap::new();
        for l in p.schedules.values().flatten() {
            let e = nodes.entry(l.kernel.name.clone()).or_default();
            for n in &l.kernel.nodes {
                if !e.contains(n) {
                    e.push(n.clone());
                }
            }
        }
        for l in p.schedules.values_mut().flatten() {
            l.kernel.nodes = nodes[&l.kernel.name].clone();
        }
        Ok(())
    }
}
