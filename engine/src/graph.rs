//! graph: the stage DAG (petgraph), its cycles named, a topological order, and stage selections.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, Reversed};

/// Stages as nodes, an edge from each upstream stage to the stage that reads it.
pub struct Dag {
    graph: DiGraph<String, ()>,
    index: HashMap<String, NodeIndex>,
}

impl Dag {
    /// `upstream[s]` lists the stages `s` reads. Names that are not keys are ignored (validation
    /// reports them separately).
    pub fn new(upstream: &BTreeMap<String, Vec<String>>) -> Self {
        let mut graph = DiGraph::new();
        let index: HashMap<String, NodeIndex> = upstream
            .keys()
            .map(|name| (name.clone(), graph.add_node(name.clone())))
            .collect();
        for (stage, inputs) in upstream {
            for input in inputs {
                if let Some(&from) = index.get(input) {
                    graph.update_edge(from, index[stage], ());
                }
            }
        }
        Dag { graph, index }
    }

    /// Every cycle, each as the stages along it starting from its alphabetically first stage.
    pub fn cycles(&self) -> Vec<Vec<String>> {
        let mut cycles: Vec<Vec<String>> = tarjan_scc(&self.graph)
            .into_iter()
            .filter(|scc| scc.len() > 1 || self.graph.contains_edge(scc[0], scc[0]))
            .map(|scc| self.cycle_through(&scc))
            .collect();
        cycles.sort();
        cycles
    }

    /// A shortest cycle inside one strongly connected component.
    fn cycle_through(&self, scc: &[NodeIndex]) -> Vec<String> {
        let members: BTreeSet<NodeIndex> = scc.iter().copied().collect();
        let start = *scc
            .iter()
            .min_by_key(|&&n| &self.graph[n])
            .expect("non-empty scc");
        let mut previous: HashMap<NodeIndex, NodeIndex> = HashMap::new();
        let mut queue = VecDeque::from([start]);
        'search: while let Some(node) = queue.pop_front() {
            for next in self.graph.neighbors(node) {
                if !members.contains(&next) || previous.contains_key(&next) {
                    continue;
                }
                previous.insert(next, node);
                if next == start {
                    break 'search;
                }
                queue.push_back(next);
            }
        }
        let mut back = Vec::new();
        let mut node = previous[&start];
        while node != start {
            back.push(self.graph[node].clone());
            node = previous[&node];
        }
        let start = self.graph[start].clone();
        let mut path = vec![start.clone()];
        path.extend(back.into_iter().rev());
        path.push(start);
        path
    }

    /// Stage names, inputs first; ties broken by name so the order is stable. `None` on a cycle.
    pub fn topological_order(&self) -> Option<Vec<String>> {
        // petgraph's toposort is deterministic for a given graph; make it name-ordered too by
        // running Kahn's algorithm over a sorted ready set.
        toposort(&self.graph, None).ok()?;
        let mut indegree: HashMap<NodeIndex, usize> = self
            .graph
            .node_indices()
            .map(|n| {
                (
                    n,
                    self.graph.neighbors_directed(n, petgraph::Incoming).count(),
                )
            })
            .collect();
        let mut ready: BTreeSet<(String, NodeIndex)> = indegree
            .iter()
            .filter(|(_, &d)| d == 0)
            .map(|(&n, _)| (self.graph[n].clone(), n))
            .collect();
        let mut order = Vec::new();
        while let Some((name, node)) = ready.pop_first() {
            order.push(name);
            for next in self.graph.neighbors(node) {
                let d = indegree.get_mut(&next).expect("known node");
                *d -= 1;
                if *d == 0 {
                    ready.insert((self.graph[next].clone(), next));
                }
            }
        }
        Some(order)
    }

    /// `stage` and everything downstream of it.
    pub fn descendants(&self, stage: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        if let Some(&start) = self.index.get(stage) {
            let mut dfs = Dfs::new(&self.graph, start);
            while let Some(n) = dfs.next(&self.graph) {
                out.insert(self.graph[n].clone());
            }
        }
        out
    }

    /// `stage` and everything upstream of it.
    pub fn ancestors(&self, stage: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        if let Some(&start) = self.index.get(stage) {
            let reversed = Reversed(&self.graph);
            let mut dfs = Dfs::new(reversed, start);
            while let Some(n) = dfs.next(reversed) {
                out.insert(self.graph[n].clone());
            }
        }
        out
    }

    /// Edges as (upstream, downstream) names, sorted.
    pub fn edges(&self) -> Vec<(String, String)> {
        let mut edges: Vec<_> = self
            .graph
            .edge_indices()
            .filter_map(|e| self.graph.edge_endpoints(e))
            .map(|(a, b)| (self.graph[a].clone(), self.graph[b].clone()))
            .collect();
        edges.sort();
        edges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dag(edges: &[(&str, &[&str])]) -> Dag {
        let upstream = edges
            .iter()
            .map(|(s, ins)| (s.to_string(), ins.iter().map(|i| i.to_string()).collect()))
            .collect();
        Dag::new(&upstream)
    }

    #[test]
    fn orders_inputs_first_and_stably() {
        let d = dag(&[("c", &["a", "b"]), ("b", &["a"]), ("a", &[]), ("z", &[])]);
        assert_eq!(d.topological_order().unwrap(), ["a", "b", "c", "z"]);
        assert_eq!(d.descendants("b"), ["b", "c"].map(String::from).into());
        assert_eq!(d.ancestors("b"), ["a", "b"].map(String::from).into());
    }

    #[test]
    fn names_the_stages_of_each_cycle() {
        let d = dag(&[
            ("a", &["c"]),
            ("b", &["a"]),
            ("c", &["b"]),
            ("d", &["d"]),
            ("e", &[]),
        ]);
        assert_eq!(d.cycles(), vec![vec!["a", "b", "c", "a"], vec!["d", "d"]]);
        assert!(d.topological_order().is_none());
    }
}
