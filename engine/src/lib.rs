//! Smelt's pipeline engine. It knows nothing about machine learning: it turns YAML into a
//! validated DAG of stages, decides what is cached, runs the rest and stores their outputs by
//! content hash. The flow, one module per arrow:
//!
//! ```text
//! YAML ─yaml─▶ Node tree ─validate─▶ Pipeline (spec) ─graph─▶ DAG ─plan─▶ Plan ─execute─▶ store + lockfile
//! ```

pub mod diagnostics;
pub mod execute;
pub mod graph;
pub mod hash;
pub mod key;
pub mod lockfile;
pub mod plan;
pub mod reference;
pub mod schema;
pub mod spec;
pub mod stage;
pub mod store;
pub mod validate;
pub mod yaml;

pub use diagnostics::{FileReport, Problem};
pub use execute::{Divergence, Executor, Observer, Outcome, StageResult};
pub use plan::{Checked, Decision, InputCheck, Plan, Planner, Reason, Selection};
pub use spec::{Override, Pipeline, StageSpec};
pub use stage::{
    Dep, DynStage, InputDirs, Metrics, ParamProblem, Port, Ports, Progress, Registry, Stage,
    StageContext, StageError,
};
pub use store::{ArtifactId, StageKey, Store};
pub use validate::{load_pipeline, LoadError};
