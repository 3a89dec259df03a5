//! validate: a parsed pipeline file → a [`Pipeline`], or every problem in it at once.
//!
//! The fixed structure (top-level keys, `uses`, `inputs`) is checked here by hand so messages can
//! be specific; each stage's `with:` block is checked against the JSON Schema generated from the
//! kind's params, and each schema error is mapped back to the YAML node it is about.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonschema::error::{TypeKind, ValidationErrorKind};

use crate::diagnostics::{FileReport, Problem};
use crate::graph::Dag;
use crate::spec::{apply_overrides, Override, Pipeline, StageSpec, FORMAT_VERSION};
use crate::stage::{DynStage, ParamProblem, Ports, Registry};
use crate::yaml::{self, Key, Node, Span, Value};

const TOP_LEVEL_KEYS: [&str; 5] = ["smelt", "name", "description", "vars", "stages"];
const STAGE_KEYS: [&str; 4] = ["uses", "with", "inputs", "description"];

/// Why a pipeline could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// The command line was wrong (missing file, bad `--set`): exit code 2.
    Usage(String),
    /// The file has problems: exit code 1.
    Invalid(FileReport),
}

/// Reads, checks and resolves a pipeline file.
pub fn load_pipeline(
    path: &Path,
    overrides: &[Override],
    registry: &Registry,
) -> Result<Pipeline, LoadError> {
    let bytes = std::fs::read(path)
        .map_err(|e| LoadError::Usage(format!("cannot read {}: {e}", path.display())))?;
    let absolute = std::path::absolute(path).map_err(|e| LoadError::Usage(e.to_string()))?;
    check_bytes(path, &absolute, bytes, overrides, registry)
}

/// [`check`] on the bytes of a file, which may not be UTF-8.
pub fn check_bytes(
    path: &Path,
    absolute: &Path,
    bytes: Vec<u8>,
    overrides: &[Override],
    registry: &Registry,
) -> Result<Pipeline, LoadError> {
    match String::from_utf8(bytes) {
        Ok(text) => check(path, absolute, Arc::new(text), overrides, registry),
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let text = Arc::new(String::from_utf8_lossy(e.as_bytes()).into_owned());
            let mut report = FileReport::new(path, text);
            report.problems.push(Problem::new(
                "smelt::encoding",
                "the file is not valid UTF-8",
                Span { offset: at, len: 1 },
            ));
            Err(LoadError::Invalid(report))
        }
    }
}

/// Checks pipeline text read from `path` (as the user named it; `absolute` is the same file).
pub fn check(
    path: &Path,
    absolute: &Path,
    text: Arc<String>,
    overrides: &[Override],
    registry: &Registry,
) -> Result<Pipeline, LoadError> {
    let mut report = FileReport::new(path, text.clone());
    let (mut root, duplicate_keys) = match yaml::parse(&text) {
        Ok(parsed) => parsed,
        Err(e) => {
            let mut problem =
                Problem::new("smelt::yaml", e.message, e.span).label("YAML error here");
            if text.len() > yaml::MAX_FILE_BYTES {
                // Quoting megabytes of source helps nobody.
                problem.span = None;
            }
            report.problems.push(problem);
            return Err(LoadError::Invalid(report));
        }
    };
    for e in duplicate_keys {
        report
            .problems
            .push(Problem::new("smelt::duplicate-key", e.message, e.span).label("duplicate"));
    }
    apply_overrides(&mut root, overrides).map_err(LoadError::Usage)?;
    let mut checker = Checker {
        registry,
        dir: absolute.parent().map(Path::to_path_buf).unwrap_or_default(),
        problems: Vec::new(),
        vars: None,
        text,
    };
    let pipeline = checker.pipeline(absolute, &root);
    report.problems.extend(checker.problems);
    report.problems.sort_by_key(|p| p.span.map(|s| s.offset));
    match pipeline {
        Some(p) if report.is_empty() => Ok(p),
        _ => Err(LoadError::Invalid(report)),
    }
}

struct Checker<'a> {
    registry: &'a Registry,
    /// The pipeline file's directory, where the files that params name are.
    dir: PathBuf,
    problems: Vec<Problem>,
    vars: Option<&'a Node>,
    text: Arc<String>,
}

/// A stage's inputs (port → upstream stages) and where each upstream reference is written.
type Wiring = (BTreeMap<String, Vec<String>>, BTreeMap<String, Span>);

/// A stage as written, before its upstream stages are known to exist.
struct Draft {
    spec: StageSpec,
    /// Span of each upstream reference, for pointing at cycles.
    input_spans: BTreeMap<String, Span>,
}

/// A stage's params resolved from its `with:` block.
struct Params {
    resolved: serde_json::Value,
    /// The block as interpolated, to point at values.
    with: Node,
    /// The values left out of `resolved` because they do not fit the schema (their problems
    /// are reported); empty when the block is valid.
    dropped: Vec<Vec<String>>,
}

impl<'a> Checker<'a> {
    fn problem(&mut self, p: Problem) {
        self.problems.push(p);
    }

    fn pipeline(&mut self, path: &Path, root: &'a Node) -> Option<Pipeline> {
        let Some(entries) = root.entries() else {
            let found = root.type_name();
            self.problem(
                Problem::new(
                    "smelt::structure",
                    format!("a pipeline file is a mapping; found {found}"),
                    root.span,
                )
                .help("start with `smelt: 1`, `name:` and `stages:`"),
            );
            return None;
        };
        self.unknown_keys(entries, &TOP_LEVEL_KEYS, "top-level key");
        self.format_version(root);
        let name = match root.get("name") {
            Some(n) => self.string(n, "`name`").unwrap_or_default(),
            None => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        if let Some(vars) = root.get("vars") {
            if vars.entries().is_some() {
                self.vars = Some(vars);
            } else if vars.value != Value::Null {
                let found = vars.type_name();
                self.problem(Problem::new(
                    "smelt::type",
                    format!("`vars` must be a mapping; found {found}"),
                    vars.span,
                ));
            }
        }
        let (drafts, complete) = self.stages(root)?;
        let upstream: BTreeMap<String, Vec<String>> = drafts
            .iter()
            .map(|(n, d)| (n.clone(), d.spec.upstream().map(String::from).collect()))
            .collect();
        let dag = Dag::new(&upstream);
        for cycle in dag.cycles() {
            // Point at the first edge of the cycle: where its second stage reads its first.
            let (reader, read) = (&cycle[1], &cycle[0]);
            let span = drafts[reader]
                .input_spans
                .get(read)
                .copied()
                .unwrap_or_default();
            self.problem(
                Problem::new(
                    "smelt::cycle",
                    format!("the stages form a cycle: {}", cycle.join(" → ")),
                    span,
                )
                .label(format!("`{reader}` reads `{read}` here"))
                .help("a stage cannot depend on its own output, directly or through other stages"),
            );
        }
        let order = dag.topological_order().filter(|_| complete)?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Some(Pipeline {
            name,
            path: path.to_path_buf(),
            dir,
            stages: drafts.into_iter().map(|(n, d)| (n, d.spec)).collect(),
            order,
            text: self.text.clone(),
        })
    }

    fn format_version(&mut self, root: &Node) {
        match root.get("smelt") {
            None => self.problem(
                Problem::new(
                    "smelt::format",
                    "missing the format version `smelt: 1`",
                    root.span,
                )
                .label("the file starts here")
                .help("add `smelt: 1` as the first key"),
            ),
            Some(v) if v.value == Value::Int(FORMAT_VERSION) => {}
            Some(v) => self.problem(
                Problem::new(
                    "smelt::format",
                    format!("this smelt reads pipeline format {FORMAT_VERSION}"),
                    v.span,
                )
                .label("unsupported format version"),
            ),
        }
    }

    fn unknown_keys(&mut self, entries: &[(Key, Node)], allowed: &[&str], what: &str) {
        for (key, _) in entries {
            if !allowed.contains(&key.name.as_str()) {
                self.problem(
                    Problem::new(
                        "smelt::unknown-key",
                        format!("unknown {what} `{}`", key.name),
                        key.span,
                    )
                    .label("not recognised")
                    .did_you_mean(&key.name, allowed.iter().copied())
                    .help_if_none(format!("expected one of: {}", allowed.join(", "))),
                );
            }
        }
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match node.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                let found = node.type_name();
                self.problem(Problem::new(
                    "smelt::type",
                    format!("{what} must be a string; found {found}"),
                    node.span,
                ));
                None
            }
        }
    }

    /// The stages that could be read, and whether that is all of them.
    fn stages(&mut self, root: &'a Node) -> Option<(BTreeMap<String, Draft>, bool)> {
        let Some(stages) = root.get("stages") else {
            self.problem(
                Problem::new(
                    "smelt::structure",
                    "the pipeline has no `stages:`",
                    root.span,
                )
                .label("in this file"),
            );
            return None;
        };
        let Some(entries) = stages.entries() else {
            let found = stages.type_name();
            let span = root.key_span_at(&["stages".into()]).unwrap_or(stages.span);
            self.problem(Problem::new(
                "smelt::structure",
                format!("`stages` must be a mapping of stage names to stages; found {found}"),
                span,
            ));
            return None;
        };
        if entries.is_empty() {
            let span = root.key_span_at(&["stages".into()]).unwrap_or(stages.span);
            self.problem(
                Problem::new("smelt::structure", "the pipeline has no stages", span)
                    .help("add at least one stage under `stages:`"),
            );
            return None;
        }
        let names: Vec<&str> = entries.iter().map(|(k, _)| k.name.as_str()).collect();
        let mut drafts = BTreeMap::new();
        for (key, node) in entries {
            if let Some(draft) = self.stage(key, node, &names) {
                drafts.insert(key.name.clone(), draft);
            }
        }
        let complete = drafts.len() == entries.len();
        Some((drafts, complete))
    }

    fn stage(&mut self, key: &Key, node: &'a Node, all: &[&str]) -> Option<Draft> {
        let name = &key.name;
        if !valid_stage_name(name) {
            self.problem(
                Problem::new(
                    "smelt::stage-name",
                    format!("`{name}` is not a valid stage name"),
                    key.span,
                )
                .help("use letters, digits, `_` and `-`, starting with a letter or `_`"),
            );
        }
        let Some(entries) = node.entries() else {
            let found = node.type_name();
            self.problem(Problem::new(
                "smelt::structure",
                format!("stage `{name}` must be a mapping with `uses:`; found {found}"),
                key.span,
            ));
            return None;
        };
        self.unknown_keys(entries, &STAGE_KEYS, "stage key");
        let kind = match node.get("uses") {
            None => {
                self.problem(
                    Problem::new(
                        "smelt::missing-uses",
                        format!("stage `{name}` does not say which kind it `uses`"),
                        key.span,
                    )
                    .help(format!(
                        "add `uses:` with one of: {}",
                        self.registry.names().collect::<Vec<_>>().join(", ")
                    )),
                );
                None
            }
            Some(uses) => self.kind(uses),
        };
        let params = kind.and_then(|k| self.params(name, k, node));
        let inputs = self.inputs(name, kind, node, key.span, all);
        // What the types cannot say: params against each other and the wired ports. Checked
        // on the params that are valid when others are not, so a file's problems come at once.
        if let (Some(kind), Some(params), Some((inputs, _))) = (kind, &params, &inputs) {
            let wired: Vec<&str> = inputs.keys().map(String::as_str).collect();
            for problem in kind.check(&params.resolved, &wired) {
                if !params.dropped.iter().any(|d| problem.involves(d)) {
                    let at = Written {
                        with: &params.with,
                        wiring: node.get("inputs"),
                    };
                    let problem = param_problem(name, at, &problem, ProblemKind::Params);
                    self.problem(problem);
                }
            }
        }
        let (inputs, input_spans) = inputs?;
        let Params {
            resolved: params,
            with,
            dropped,
        } = params?;
        if !dropped.is_empty() {
            return None;
        }
        let kind = kind?;
        let written = Written {
            with: &with,
            wiring: node.get("inputs"),
        };
        for problem in kind.check_files(&params, &self.dir) {
            self.problem(param_problem(name, written, &problem, ProblemKind::Files));
        }
        Some(Draft {
            spec: StageSpec {
                name: name.clone(),
                kind: kind.kind().to_string(),
                params,
                inputs,
                with,
                wiring: node.get("inputs").cloned(),
            },
            input_spans,
        })
    }

    fn kind(&mut self, uses: &Node) -> Option<&'a dyn DynStage> {
        let kind = self.string(uses, "`uses`")?;
        match self.registry.get(&kind) {
            Some(k) => Some(k.as_ref()),
            None => {
                let known: Vec<&str> = self.registry.names().collect();
                self.problem(
                    Problem::new(
                        "smelt::unknown-kind",
                        format!("unknown stage kind `{kind}`"),
                        uses.span,
                    )
                    .label("no such stage kind")
                    .did_you_mean(&kind, known.iter().copied())
                    .help_if_none(format!("known kinds: {}", known.join(", "))),
                );
                None
            }
        }
    }

    /// Interpolates, schema-checks and resolves a stage's `with:` block. When it does not fit
    /// the schema, its problems are reported and the params are resolved once more without the
    /// values at fault (defaults in their place), so the kind's own checks can still run on the
    /// rest; `None` when even that fails.
    fn params(&mut self, stage: &str, kind: &dyn DynStage, node: &Node) -> Option<Params> {
        let empty = Node::new(Value::Map(Vec::new()), node.span);
        let with = match node.get("with") {
            None => &empty,
            Some(w) if w.value == Value::Null => &empty,
            Some(w) => w,
        };
        let with = self.interpolate(with);
        let json = with.to_json();
        // The params types are the contract and the schema is generated from them (bounds
        // included: a bounded type refuses what its schema refuses), so params that deserialize
        // are valid. Only when they do not is the schema compiled (it costs a few milliseconds)
        // to find every problem, each with its place.
        let serde_error = match kind.resolve_params(&json) {
            Ok(resolved) => {
                return Some(Params {
                    resolved,
                    with,
                    dropped: Vec::new(),
                })
            }
            Err(e) => e,
        };
        let schema = kind.params_schema();
        let before = self.problems.len();
        let params = ParamsCheck {
            stage,
            kind: kind.kind(),
            root: &schema,
            with: &with,
            json: &json,
        };
        self.problems.extend(params.explain(&schema, &[]));
        if self.problems.len() == before {
            let message = format!("invalid params for `{stage}`: {serde_error}");
            self.problem(Problem::new("smelt::params", message, with.span));
            return None;
        }
        let (rest, dropped) = without_invalid_values(&schema, json);
        let resolved = kind.resolve_params(&rest).ok()?;
        Some(Params {
            resolved,
            with,
            dropped,
        })
    }

    /// Replaces `${vars.x}` in strings: a string that is only a reference takes the variable's
    /// value and type; a reference inside a longer string is spliced in as text.
    fn interpolate(&mut self, node: &Node) -> Node {
        let value = match &node.value {
            Value::Str(s) if s.contains("${") => return self.interpolate_str(s, node.span),
            Value::Seq(items) => Value::Seq(items.iter().map(|n| self.interpolate(n)).collect()),
            Value::Map(entries) => Value::Map(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), self.interpolate(v)))
                    .collect(),
            ),
            other => other.clone(),
        };
        Node::new(value, node.span)
    }

    fn interpolate_str(&mut self, s: &str, span: Span) -> Node {
        let mut out = String::new();
        let mut rest = s;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let Some(len) = rest[start..].find('}') else {
                self.problem(
                    Problem::new("smelt::interpolation", "unterminated `${`", span)
                        .help("write `${vars.NAME}`"),
                );
                return Node::new(Value::Str(s.to_string()), span);
            };
            let reference = &rest[start + 2..start + len];
            let Some(value) = self.lookup_var(reference, span) else {
                return Node::new(Value::Str(s.to_string()), span);
            };
            let whole = start == 0 && start + len + 1 == rest.len() && out.is_empty();
            if whole {
                return Node::new(value.value.clone(), span);
            }
            match &value.value {
                Value::Str(v) => out.push_str(v),
                Value::Int(i) => out.push_str(&i.to_string()),
                Value::Float(f) => out.push_str(&f.to_string()),
                Value::Bool(b) => out.push_str(&b.to_string()),
                _ => {
                    self.problem(Problem::new(
                        "smelt::interpolation",
                        format!(
                            "`${{{reference}}}` is {} and cannot be spliced into a string",
                            value.type_name()
                        ),
                        span,
                    ));
                }
            }
            rest = &rest[start + len + 1..];
        }
        out.push_str(rest);
        Node::new(Value::Str(out), span)
    }

    fn lookup_var(&mut self, reference: &str, span: Span) -> Option<&'a Node> {
        let Some(name) = reference.trim().strip_prefix("vars.") else {
            self.problem(Problem::new(
                "smelt::interpolation",
                format!("`${{{reference}}}`: only `${{vars.NAME}}` can be interpolated"),
                span,
            ));
            return None;
        };
        let path: Vec<String> = name.split('.').map(String::from).collect();
        let found = self.vars.and_then(|v| v.lookup(&path));
        if found.is_none() {
            let known: Vec<&str> = self
                .vars
                .and_then(Node::entries)
                .map(|e| e.iter().map(|(k, _)| k.name.as_str()).collect())
                .unwrap_or_default();
            self.problem(
                Problem::new(
                    "smelt::undefined-var",
                    format!("undefined variable `vars.{name}`"),
                    span,
                )
                .label("not defined under `vars:`")
                .did_you_mean(name, known.iter().copied())
                .help_if_none(
                    "define it under `vars:` at the top of the file, or pass --set vars.NAME=VALUE",
                ),
            );
        }
        found
    }

    fn inputs(
        &mut self,
        stage: &str,
        kind: Option<&dyn DynStage>,
        node: &Node,
        stage_span: Span,
        all: &[&str],
    ) -> Option<Wiring> {
        let mut inputs = BTreeMap::new();
        let mut spans = BTreeMap::new();
        let before = self.problems.len();
        let entries = match node.get("inputs") {
            None => &[][..],
            Some(n) if n.value == Value::Null => &[][..],
            Some(n) => match n.entries() {
                Some(e) => e,
                None => {
                    let found = n.type_name();
                    self.problem(Problem::new(
                        "smelt::type",
                        format!("`inputs` must map port names to stages; found {found}"),
                        n.span,
                    ));
                    return None;
                }
            },
        };
        let ports = kind.map(|k| k.ports());
        for (port, value) in entries {
            if let Some(Ports::Declared(declared)) = &ports {
                if !declared.iter().any(|p| p.name == port.name) {
                    let names: Vec<&str> = declared.iter().map(|p| p.name).collect();
                    let kind = kind.map(|k| k.kind()).unwrap_or_default();
                    self.problem(
                        Problem::new(
                            "smelt::unknown-port",
                            format!("`{kind}` stages have no input `{}`", port.name),
                            port.span,
                        )
                        .did_you_mean(&port.name, names.iter().copied())
                        .help_if_none(format!("inputs of `{kind}`: {}", names.join(", "))),
                    );
                }
            }
            let refs: Vec<&Node> = match &value.value {
                Value::Str(_) => vec![value],
                Value::Seq(items) => items.iter().collect(),
                _ => {
                    let found = value.type_name();
                    self.problem(Problem::new(
                        "smelt::type",
                        format!(
                            "input `{}` must name a stage or a list of stages; found {found}",
                            port.name
                        ),
                        value.span,
                    ));
                    continue;
                }
            };
            let mut upstream = Vec::new();
            for r in refs {
                let Some(name) = self.string(r, "an input") else {
                    continue;
                };
                if name == stage {
                    self.problem(
                        Problem::new(
                            "smelt::self-input",
                            format!("stage `{stage}` reads its own output"),
                            r.span,
                        )
                        .label("wired to itself"),
                    );
                } else if !all.contains(&name.as_str()) {
                    self.problem(
                        Problem::new(
                            "smelt::unknown-stage",
                            format!(
                                "input `{}` refers to a stage `{name}` that does not exist",
                                port.name
                            ),
                            r.span,
                        )
                        .label("no such stage")
                        .did_you_mean(&name, all.iter().copied()),
                    );
                }
                spans.insert(name.clone(), r.span);
                upstream.push(name);
            }
            inputs.insert(port.name.clone(), upstream);
        }
        if let Some(Ports::Declared(declared)) = &ports {
            for p in declared
                .iter()
                .filter(|p| p.required && !inputs.contains_key(p.name))
            {
                self.problem(
                    Problem::new(
                        "smelt::missing-input",
                        format!("stage `{stage}` needs an input `{}` ({})", p.name, p.doc),
                        stage_span,
                    )
                    .help(format!("add `inputs: {{ {}: <stage> }}`", p.name)),
                );
            }
            for p in declared.iter().filter(|p| !p.many) {
                if inputs.get(p.name).is_some_and(|v| v.len() > 1) {
                    let span = spans.get(&inputs[p.name][1]).copied().unwrap_or(stage_span);
                    self.problem(Problem::new(
                        "smelt::type",
                        format!("input `{}` takes one stage, not a list", p.name),
                        span,
                    ));
                }
            }
        }
        (self.problems.len() == before).then_some((inputs, spans))
    }
}

/// Which of a kind's own checks found a problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// [`crate::Stage::check`]: params against each other and the wiring.
    Params,
    /// [`crate::Stage::check_inputs`]: params against the input artifacts.
    Data,
    /// [`crate::Stage::check_files`]: the files next to the pipeline that params name.
    Files,
}

/// Where a stage's params and inputs are written, to point at them.
#[derive(Clone, Copy)]
pub struct Written<'a> {
    pub with: &'a Node,
    pub wiring: Option<&'a Node>,
}

/// A kind's own problem with a stage's params, pointing at the input it is about, else the
/// first of its values written in `with` (a default is not written: then the next value
/// involved, or the nearest block).
pub fn param_problem(
    stage: &str,
    written: Written<'_>,
    problem: &ParamProblem,
    kind: ProblemKind,
) -> Problem {
    let paths: Vec<Vec<String>> = problem
        .at
        .iter()
        .map(|p| {
            p.split('.')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .collect();
    let with = written.with;
    let wired = problem.input.as_ref().and_then(|(port, index)| {
        let listed = written.wiring?.get(port)?;
        match &listed.value {
            Value::Seq(items) => items.get(*index).or(Some(listed)),
            _ => Some(listed),
        }
    });
    let span = wired
        .or_else(|| paths.iter().find_map(|p| with.lookup(p)))
        .unwrap_or_else(|| with.at_path(paths.first().map_or(&[][..], Vec::as_slice)))
        .span;
    let (code, label) = match kind {
        ProblemKind::Params => ("smelt::invalid-param", "refused"),
        ProblemKind::Data => ("smelt::data-check", "does not fit the input data"),
        ProblemKind::Files => ("smelt::file-check", "refused"),
    };
    let message = format!("{} (stage `{stage}`)", problem.message);
    let found = Problem::new(code, message, span).label(label);
    match &problem.help {
        Some(help) => found.help(help.clone()),
        None => found,
    }
}

/// Problems that [`crate::Stage::check_inputs`] found in a valid pipeline, as a report on its
/// file (`shown_as`: the path as the user named it), sorted by place.
pub fn data_report(
    pipeline: &Pipeline,
    shown_as: &Path,
    problems: &[(String, ParamProblem)],
) -> FileReport {
    let mut report = FileReport::new(shown_as, pipeline.text.clone());
    for (stage, problem) in problems {
        let spec = &pipeline.stages[stage];
        let written = Written {
            with: &spec.with,
            wiring: spec.wiring.as_ref(),
        };
        report
            .problems
            .push(param_problem(stage, written, problem, ProblemKind::Data));
    }
    report.problems.sort_by_key(|p| p.span.map(|s| s.offset));
    report
}

impl Problem {
    fn help_if_none(self, help: impl Into<String>) -> Self {
        if self.help.is_some() {
            self
        } else {
            self.help(help)
        }
    }
}

/// Explains why a stage's params do not fit its schema, one problem per mistake.
struct ParamsCheck<'a> {
    stage: &'a str,
    kind: &'a str,
    /// The kind's whole params schema (sub-schemas refer into its `$defs`).
    root: &'a serde_json::Value,
    with: &'a Node,
    json: &'a serde_json::Value,
}

impl ParamsCheck<'_> {
    /// Problems with the value at `base` against `schema` (a sub-schema of `root`).
    fn explain(&self, schema: &serde_json::Value, base: &[String]) -> Vec<Problem> {
        let mut standalone = schema.clone();
        if let (Some(obj), Some(defs)) = (standalone.as_object_mut(), self.root.get("$defs")) {
            obj.insert("$defs".into(), defs.clone());
        }
        let validator = jsonschema::validator_for(&standalone).expect("generated schemas compile");
        let instance = self.value_at(base);
        let mut problems = Vec::new();
        for error in validator.iter_errors(instance) {
            let path: Vec<String> = base
                .iter()
                .cloned()
                .chain(pointer_segments(error.instance_path.as_str()))
                .collect();
            match &error.kind {
                // One error lists every unknown key of a mapping: report each at its place.
                ValidationErrorKind::AdditionalProperties { unexpected } => {
                    for name in unexpected {
                        problems.push(unknown_param(
                            self.stage, self.kind, self.root, self.with, &path, name,
                        ));
                    }
                }
                // "Not valid under any variant" says little: find the variant the value names.
                ValidationErrorKind::OneOfNotValid { .. } | ValidationErrorKind::AnyOf { .. } => {
                    match self.variant(&path) {
                        Variant::Named(branch) => problems.extend(self.explain(branch, &path)),
                        Variant::Unknown(problem) => problems.push(problem),
                        Variant::NotTagged => problems.push(schema_problem(
                            self.stage,
                            self.with,
                            &path,
                            &error.kind,
                            &error.to_string(),
                        )),
                    }
                }
                kind => problems.push(schema_problem(
                    self.stage,
                    self.with,
                    &path,
                    kind,
                    &error.to_string(),
                )),
            }
        }
        problems
    }

    fn value_at(&self, path: &[String]) -> &serde_json::Value {
        let pointer: String = path
            .iter()
            .map(|s| format!("/{}", s.replace('~', "~0").replace('/', "~1")))
            .collect();
        self.json
            .pointer(&pointer)
            .unwrap_or(&serde_json::Value::Null)
    }

    /// The branch of a union (`anyOf`, `oneOf`) that the value at `path` is meant for: the
    /// variant an externally tagged value names (`{files: {...}}`); else the mapping whose keys
    /// the written ones match best (`train: {model: bpe, vocab_sise: 512}` is a vocabulary
    /// block with a misspelt key, not a wrong `null`); else the one branch that is not `null`.
    /// Its own mistakes are then reported at their places.
    fn variant(&self, path: &[String]) -> Variant<'_> {
        let value = self.value_at(path);
        if let Some(word) = value.as_str() {
            return self.unit_variant(path, word);
        }
        let branches: Vec<&serde_json::Value> = schemas_at(self.root, self.root, path)
            .into_iter()
            .filter(|b| b.get("anyOf").is_none() && b.get("oneOf").is_none())
            .collect();
        if let Some(object) = value.as_object() {
            if object.len() == 1 {
                if let Some(tagged) = self.tagged_variant(path, object, &branches) {
                    return tagged;
                }
            }
            let matched = |b: &serde_json::Value| {
                let properties = b.get("properties").and_then(|p| p.as_object());
                properties.map(|p| object.keys().filter(|k| p.contains_key(*k)).count())
            };
            let best = branches
                .iter()
                .filter_map(|b| Some((matched(b)?, *b)))
                .reduce(|best, next| if next.0 > best.0 { next } else { best });
            if let Some((_, branch)) = best {
                return Variant::Named(branch);
            }
        }
        match branches.as_slice() {
            [one] if one.get("type").is_some_and(|t| t != "null") => Variant::Named(one),
            [a, b] if b.get("type").is_some_and(|t| t == "null") => Variant::Named(a),
            [a, b] if a.get("type").is_some_and(|t| t == "null") => Variant::Named(b),
            _ => Variant::NotTagged,
        }
    }

    /// For a value like `{files: {...}}` (an externally tagged enum), the variant it names, or
    /// the problem that it names none; `None` when the union is not tagged.
    fn tagged_variant<'s>(
        &'s self,
        path: &[String],
        object: &serde_json::Map<String, serde_json::Value>,
        candidates: &[&'s serde_json::Value],
    ) -> Option<Variant<'s>> {
        let tag = object.keys().next().expect("one key");
        let branches: Vec<(&str, &serde_json::Value)> = candidates
            .iter()
            .filter_map(|b| {
                match b
                    .get("required")
                    .and_then(|r| r.as_array())
                    .map(Vec::as_slice)
                {
                    Some([serde_json::Value::String(name)])
                        if b.get("properties").is_some_and(|p| p.get(name).is_some())
                            && b["properties"].as_object().is_some_and(|p| p.len() == 1) =>
                    {
                        Some((name.as_str(), *b))
                    }
                    _ => None,
                }
            })
            .collect();
        if let Some((_, branch)) = branches.iter().find(|(name, _)| name == tag) {
            return Some(Variant::Named(branch));
        }
        if branches.is_empty() {
            return None;
        }
        let mut key_path = path.to_vec();
        key_path.push(tag.clone());
        let span = self
            .with
            .key_span_at(&key_path)
            .unwrap_or(self.with.at_path(path).span);
        let names: Vec<&str> = branches.iter().map(|(n, _)| *n).collect();
        let problem = Problem::new(
            "smelt::unknown-variant",
            format!(
                "`{tag}` is not one of: {} (stage `{}`)",
                names.join(", "),
                self.stage
            ),
            span,
        )
        .label("unknown kind of entry")
        .did_you_mean(tag, names.iter().copied());
        Some(Variant::Unknown(problem))
    }
}

impl ParamsCheck<'_> {
    /// A string that matches none of an enum's values (`oneOf` of `const`s, or `enum`).
    fn unit_variant(&self, path: &[String], word: &str) -> Variant<'_> {
        let names: Vec<&str> = schemas_at(self.root, self.root, path)
            .into_iter()
            .flat_map(|b| {
                let consts = b.get("const").into_iter();
                let enums = b
                    .get("enum")
                    .and_then(|e| e.as_array())
                    .into_iter()
                    .flatten();
                consts.chain(enums).filter_map(|v| v.as_str())
            })
            .collect();
        if names.is_empty() {
            return Variant::NotTagged;
        }
        let dotted = format!("with.{}", path.join("."));
        let problem = Problem::new(
            "smelt::invalid-value",
            format!(
                "`{dotted}` of stage `{}` must be one of: {}",
                self.stage,
                names.join(", ")
            ),
            self.with.at_path(path).span,
        )
        .label("not an allowed value")
        .did_you_mean(word, names.iter().copied());
        Variant::Unknown(problem)
    }
}

enum Variant<'s> {
    Named(&'s serde_json::Value),
    Unknown(Problem),
    NotTagged,
}

/// `params` without the values the schema refuses (unknown keys, wrong types, values out of
/// range), and the paths of those values. Removing a value can expose another error (a required
/// key now missing), so it repeats a few times.
fn without_invalid_values(
    schema: &serde_json::Value,
    mut params: serde_json::Value,
) -> (serde_json::Value, Vec<Vec<String>>) {
    let validator = jsonschema::validator_for(schema).expect("generated schemas compile");
    let mut dropped = Vec::new();
    for _ in 0..4 {
        let mut faults = Vec::new();
        for error in validator.iter_errors(&params) {
            let path = pointer_segments(error.instance_path.as_str());
            match &error.kind {
                ValidationErrorKind::AdditionalProperties { unexpected } => {
                    faults.extend(unexpected.iter().map(|name| {
                        let mut key = path.clone();
                        key.push(name.clone());
                        key
                    }));
                }
                _ => faults.push(path),
            }
        }
        // A fault at the root, or one already dropped, cannot be taken out any further.
        if faults.is_empty() || faults.iter().any(|f| f.is_empty() || dropped.contains(f)) {
            break;
        }
        for fault in faults {
            remove_at(&mut params, &fault);
            dropped.push(fault);
        }
    }
    (params, dropped)
}

/// Removes the value at `path` (object keys; list items are replaced by `null`, keeping the
/// other items' indices).
fn remove_at(value: &mut serde_json::Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = value;
    for segment in parents {
        let next = match at {
            serde_json::Value::Object(map) => map.get_mut(segment),
            serde_json::Value::Array(items) => {
                segment.parse::<usize>().ok().and_then(|i| items.get_mut(i))
            }
            _ => None,
        };
        let Some(next) = next else {
            return;
        };
        at = next;
    }
    match at {
        serde_json::Value::Object(map) => {
            map.remove(last);
        }
        serde_json::Value::Array(items) => {
            if let Some(item) = last.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                *item = serde_json::Value::Null;
            }
        }
        _ => {}
    }
}

fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// "/a/b~1c" → ["a", "b/c"]
fn pointer_segments(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// An unknown key `name` in the params mapping at `path`, with "did you mean".
fn unknown_param(
    stage: &str,
    kind: &str,
    schema: &serde_json::Value,
    with: &Node,
    path: &[String],
    name: &str,
) -> Problem {
    let mut key_path = path.to_vec();
    key_path.push(name.to_string());
    let span = with
        .key_span_at(&key_path)
        .unwrap_or(with.at_path(path).span);
    let known = property_names(schema, path);
    let block = std::iter::once("with")
        .chain(path.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(".");
    let guess = crate::diagnostics::closest(name, known.iter().map(String::as_str))
        .map(|best| format!(" (did you mean `{best}`?)"))
        .unwrap_or_default();
    let problem = Problem::new(
        "smelt::unknown-param",
        format!("unknown key `{name}` in `{block}` of `{kind}` stage `{stage}`{guess}"),
        span,
    )
    .label("unknown key");
    if known.is_empty() {
        problem
    } else {
        problem.help(format!("`{block}` takes: {}", known.join(", ")))
    }
}

/// Turns one schema error into a problem that points at the YAML it is about.
fn schema_problem(
    stage: &str,
    with: &Node,
    path: &[String],
    error: &ValidationErrorKind,
    fallback: &str,
) -> Problem {
    let node = with.at_path(path);
    let dotted = if path.is_empty() {
        "with".to_string()
    } else {
        format!("with.{}", path.join("."))
    };
    match error {
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            let span = with.key_span_at(path).unwrap_or(node.span);
            Problem::new(
                "smelt::missing-param",
                format!(
                    "stage `{stage}` is missing the required param `{}`",
                    join(&dotted, name)
                ),
                span,
            )
            .label("required here")
        }
        ValidationErrorKind::Type { kind: expected } => {
            let expected = match expected {
                TypeKind::Single(t) => t.to_string(),
                TypeKind::Multiple(set) => set
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(" or "),
            };
            let expected = expected
                .replace("object", "mapping")
                .replace("array", "list");
            Problem::new(
                "smelt::type",
                format!(
                    "`{dotted}` of stage `{stage}` must be {expected}; found {}",
                    node.type_name()
                ),
                node.span,
            )
            .label(format!("expected {expected}"))
        }
        ValidationErrorKind::Enum { options } => {
            let options: Vec<String> = options
                .as_array()
                .into_iter()
                .flatten()
                .map(|o| o.to_string())
                .collect();
            let wrong = node.as_str().unwrap_or_default();
            let plain: Vec<String> = options
                .iter()
                .map(|o| o.trim_matches('"').to_string())
                .collect();
            Problem::new(
                "smelt::invalid-value",
                format!(
                    "`{dotted}` of stage `{stage}` must be one of {}",
                    options.join(", ")
                ),
                node.span,
            )
            .label("not an allowed value")
            .did_you_mean(wrong, plain.iter().map(String::as_str))
        }
        ValidationErrorKind::Minimum { limit }
        | ValidationErrorKind::ExclusiveMinimum { limit }
        | ValidationErrorKind::Maximum { limit }
        | ValidationErrorKind::ExclusiveMaximum { limit } => {
            let (bound, label) = match error {
                ValidationErrorKind::Minimum { .. } => ("at least", "too small"),
                ValidationErrorKind::ExclusiveMinimum { .. } => ("above", "too small"),
                ValidationErrorKind::Maximum { .. } => ("at most", "too large"),
                _ => ("below", "too large"),
            };
            Problem::new(
                "smelt::invalid-value",
                format!(
                    "`{dotted}` of stage `{stage}` must be {bound} {limit}; found {}",
                    node.to_json()
                ),
                node.span,
            )
            .label(label)
        }
        ValidationErrorKind::MinItems { limit } => Problem::new(
            "smelt::invalid-value",
            format!(
                "`{dotted}` of stage `{stage}` must list at least {limit}; found {}",
                match node.to_json().as_array().map_or(0, Vec::len) {
                    0 => "none".to_string(),
                    n => n.to_string(),
                }
            ),
            node.span,
        )
        .label("too few"),
        ValidationErrorKind::Pattern { pattern } => Problem::new(
            "smelt::invalid-value",
            format!("`{dotted}` of stage `{stage}` must match the pattern `{pattern}`"),
            node.span,
        )
        .label("does not match"),
        _ => Problem::new(
            "smelt::invalid-value",
            format!("`{dotted}` of stage `{stage}`: {fallback}"),
            node.span,
        )
        .label("invalid"),
    }
}

fn join(prefix: &str, name: &str) -> String {
    format!("{prefix}.{name}")
        .trim_start_matches("with.")
        .to_string()
}

/// The property names the schema allows for the object at `path` (for "did you mean").
fn property_names(root: &serde_json::Value, path: &[String]) -> Vec<String> {
    let mut names: Vec<String> = schemas_at(root, root, path)
        .into_iter()
        .filter_map(|s| s.get("properties").and_then(|p| p.as_object()))
        .flat_map(|p| p.keys().cloned())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Every sub-schema that may apply to the value at `path` (through `$ref` and combinators).
fn schemas_at<'s>(
    root: &'s serde_json::Value,
    schema: &'s serde_json::Value,
    path: &[String],
) -> Vec<&'s serde_json::Value> {
    let schema = resolve_ref(root, schema);
    let mut found = Vec::new();
    for combinator in ["allOf", "anyOf", "oneOf"] {
        for branch in schema
            .get(combinator)
            .and_then(|b| b.as_array())
            .into_iter()
            .flatten()
        {
            found.extend(schemas_at(root, branch, path));
        }
    }
    let Some((first, rest)) = path.split_first() else {
        found.push(schema);
        return found;
    };
    let next = schema
        .get("properties")
        .and_then(|p| p.get(first))
        .or_else(|| {
            schema
                .get("items")
                .filter(|_| first.parse::<usize>().is_ok())
        })
        .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()));
    if let Some(next) = next {
        found.extend(schemas_at(root, next, rest));
    }
    found
}

fn resolve_ref<'s>(
    root: &'s serde_json::Value,
    schema: &'s serde_json::Value,
) -> &'s serde_json::Value {
    match schema
        .get("$ref")
        .and_then(|r| r.as_str())
        .and_then(|r| r.strip_prefix('#'))
    {
        Some(pointer) => root
            .pointer(pointer)
            .map_or(schema, |s| resolve_ref(root, s)),
        None => schema,
    }
}
