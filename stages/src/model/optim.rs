//! AdamW with global-norm clipping and gradient accumulation, over the [`ParamVisitor`].
//!
//! dfdx 0.13's optimizers need compile-time shapes and know no clipping, accumulation or saved
//! moments; this module adds them. The update is a device's own: on the CPU one fused,
//! multithreaded pass per parameter with the clip folded in (`kernels::adamw`); elsewhere dfdx's
//! shape-generic Adam kernel (`AdamConfig::try_update`) after a separate clip.

use dfdx::prelude::*;
use rayon::prelude::*;

use super::kernels::adamw::{self, AdamStep};
#[cfg(feature = "cuda")]
use super::kernels::cuda;
use super::kernels::{GradBuffer, Kernels};
use super::layers::{ParamVisitor, Visit};

/// In-place arithmetic on gradient buffers, which dfdx exposes only as the device's storage
/// type: one impl per device.
pub trait Buffers: Device<f32> {
    fn sum_squares(&self, g: &<Self as Storage<f32>>::Vec) -> f64;
    fn scale(&self, g: &mut <Self as Storage<f32>>::Vec, by: f32);
    /// `into += from * by`.
    fn add_scaled(
        &self,
        into: &mut <Self as Storage<f32>>::Vec,
        from: &<Self as Storage<f32>>::Vec,
        by: f32,
    );
    /// `into += host`.
    fn add_host(&self, into: &mut <Self as Storage<f32>>::Vec, host: &[f32]);
    fn download(&self, g: &<Self as Storage<f32>>::Vec) -> Vec<f32>;
    fn upload(&self, host: &[f32], g: &mut <Self as Storage<f32>>::Vec);
    /// Frees what `g` holds, leaving an empty buffer in its place; false where the device cannot
    /// (the caller then drops the whole `Gradients` instead).
    fn release(&self, g: &mut <Self as Storage<f32>>::Vec) -> bool;
    /// One AdamW update of `p` from its gradient `g` (which it may overwrite), with the buffers
    /// `state` keeps for it.
    fn adamw<S: Shape>(
        &self,
        p: &mut Tensor<S, f32, Self>,
        g: &mut <Self as Storage<f32>>::Vec,
        state: &mut AdamState<Self>,
        step: &AdamStep,
    );
}

impl Buffers for Cpu {
    fn sum_squares(&self, g: &<Self as Storage<f32>>::Vec) -> f64 {
        adamw::sum_squares(g)
    }

    fn scale(&self, g: &mut <Self as Storage<f32>>::Vec, by: f32) {
        adamw::scale(g, by);
    }

    fn add_scaled(
        &self,
        into: &mut <Self as Storage<f32>>::Vec,
        from: &<Self as Storage<f32>>::Vec,
        by: f32,
    ) {
        adamw::add_scaled(into, from, by);
    }

    fn add_host(&self, into: &mut <Self as Storage<f32>>::Vec, host: &[f32]) {
        into.iter_mut().zip(host).for_each(|(a, b)| *a += b);
    }

    fn download(&self, g: &<Self as Storage<f32>>::Vec) -> Vec<f32> {
        g.to_vec()
    }

    fn upload(&self, host: &[f32], g: &mut <Self as Storage<f32>>::Vec) {
        g.copy_from_slice(host);
    }

    fn release(&self, g: &mut <Self as Storage<f32>>::Vec) -> bool {
        *g = self.try_alloc_len(0).expect("an empty buffer");
        true
    }

    /// dfdx lends no mutable access to a tensor's values, so the update works on the master
    /// copy and copies the result into the tensor: one more write than updating in place.
    /// That copy (dfdx's `copy_from`) runs on one thread, so the update is deferred to
    /// [`AdamW::step`], which runs the parameters' updates side by side.
    fn adamw<S: Shape>(
        &self,
        p: &mut Tensor<S, f32, Self>,
        g: &mut <Self as Storage<f32>>::Vec,
        state: &mut AdamState<Self>,
        step: &AdamStep,
    ) {
        let master = state.master.get_or_alloc_mut(&*p).expect("master buffer");
        if state.master_current {
            debug_assert!(
                p.as_vec() == **master,
                "weights were written without AdamW::weights_changed"
            );
        } else {
            p.copy_into(master);
        }
        let master = GradBuffer::new(master);
        let m = GradBuffer::new(state.m.get_or_alloc_mut(&*p).expect("moment buffer"));
        let v = GradBuffer::new(state.v.get_or_alloc_mut(&*p).expect("moment buffer"));
        let update = DeferredUpdate {
            p,
            master,
            m,
            v,
            g: GradBuffer::new(g),
            step: *step,
        };
        state.deferred.push(Box::new(move || update.run()));
    }
}

/// One parameter's AdamW update and the copy into its tensor, run by [`AdamW::step`] after
/// every parameter's was recorded.
struct DeferredUpdate<S: Shape> {
    p: *mut Tensor<S, f32, Cpu>,
    master: GradBuffer,
    m: GradBuffer,
    v: GradBuffer,
    g: GradBuffer,
    step: AdamStep,
}

// SAFETY: an update touches only its own parameter's tensor and buffers (see `run`).
unsafe impl<S: Shape> Send for DeferredUpdate<S> {}

impl<S: Shape> DeferredUpdate<S> {
    fn run(self) {
        // SAFETY: `AdamW::step` runs the updates while it holds the model, the optimizer's
        // state and the gradients mutably and touches none of them otherwise; each update is
        // for a distinct parameter, so its tensor and buffers are its alone.
        unsafe {
            let master = self.master.write();
            adamw::adamw(
                &self.step,
                master,
                self.m.write(),
                self.v.write(),
                self.g.write(),
            );
            (*self.p).copy_from(master);
        }
    }
}

#[cfg(feature = "cuda")]
impl Buffers for Cuda {
    fn sum_squares(&self, g: &<Self as Storage<f32>>::Vec) -> f64 {
        cuda::sum_squares(g)
    }

    fn scale(&self, g: &mut <Self as Storage<f32>>::Vec, by: f32) {
        cuda::scale(g, by);
    }

    fn add_scaled(
        &self,
        into: &mut <Self as Storage<f32>>::Vec,
        from: &<Self as Storage<f32>>::Vec,
        by: f32,
    ) {
        cuda::add_scaled(into, from, by);
    }

    fn add_host(&self, into: &mut <Self as Storage<f32>>::Vec, host: &[f32]) {
        let slice: &cudarc::driver::CudaSlice<f32> = into;
        let from = slice
            .device()
            .htod_sync_copy(host)
            .expect("host to device copy");
        cuda::add_scaled(into, &from, 1.0);
    }

    fn download(&self, g: &<Self as Storage<f32>>::Vec) -> Vec<f32> {
        let slice: &cudarc::driver::CudaSlice<f32> = g;
        slice
            .device()
            .dtoh_sync_copy(slice)
            .expect("device to host copy")
    }

    fn upload(&self, host: &[f32], g: &mut <Self as Storage<f32>>::Vec) {
        let slice: &mut cudarc::driver::CudaSlice<f32> = g;
        let device = slice.device();
        device
            .htod_sync_copy_into(host, slice)
            .expect("host to device copy");
    }

    /// Kept: an empty `CudaSlice` is a zero-byte allocation cudarc may refuse, and this path
    /// cannot be run here to find out.
    fn release(&self, _: &mut <Self as Storage<f32>>::Vec) -> bool {
        false
    }

    /// dfdx's Adam kernel updates the tensor in place: no master copy.
    fn adamw<S: Shape>(
        &self,
        p: &mut Tensor<S, f32, Self>,
        g: &mut <Self as Storage<f32>>::Vec,
        state: &mut AdamState<Self>,
        step: &AdamStep,
    ) {
        if let Some(by) = step.grad_scale {
            self.scale(g, by);
        }
        let config = step.dfdx_config();
        let m = state.m.get_or_alloc_mut(&*p).expect("moment buffer");
        let v = state.v.get_or_alloc_mut(&*p).expect("moment buffer");
        config.try_update(step.t, p, m, v, g).expect("AdamW update");
    }
}

/// Optimizer settings.
#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// For a model that is loaded to run, not to train (generation, evaluation, export): it
    /// never steps, so any valid settings do.
    pub const UNUSED: AdamWConfig = AdamWConfig {
        betas: [0.9, 0.999],
        eps: 1e-8,
        weight_decay: 0.0,
    };
}

pub struct AdamW<D: Device<f32>> {
    pub config: AdamWConfig,
    /// Updates done so far (Adam's bias correction needs it).
    pub t: i32,
    state: AdamState<D>,
}

/// Per-parameter buffers, keyed by parameter (dfdx's gradient maps serve as storage).
pub struct AdamState<D: Device<f32>> {
    m: Gradients<f32, D>,
    v: Gradients<f32, D>,
    /// The parameters' values as the last update left them, on devices whose update cannot
    /// write a tensor in place (the CPU): it updates these and copies them into the tensor.
    master: Gradients<f32, D>,
    /// Whether `master` holds the current values: false at first and after anything but the
    /// update wrote the weights.
    master_current: bool,
    /// Updates recorded by a device that defers them (the CPU), run together by the step.
    deferred: Vec<Box<dyn FnOnce() + Send>>,
}

impl<D: Kernels> AdamW<D> {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            t: 0,
            state: AdamState {
                m: Gradients::leaky(),
                v: Gradients::leaky(),
                master: Gradients::leaky(),
                master_current: false,
                deferred: Vec::new(),
            },
        }
    }

    /// Must be called whenever the model's weights are written other than by [`AdamW::step`]
    /// (loading, merging, adding adapters), so the next update starts from them.
    pub fn weights_changed(&mut self) {
        self.state.master_current = false;
    }

    /// Clips `grads` to `max_norm` (global L2 norm, when given) and applies one AdamW update
    /// with learning rate `lr`. Returns the norm before clipping.
    pub fn step(
        &mut self,
        model: &mut impl Visit<D>,
        grads: &mut Gradients<f32, D>,
        lr: f64,
        max_norm: Option<f32>,
    ) -> f32 {
        // Left over only if an earlier step panicked part way: their buffers may be gone.
        self.state.deferred.clear();
        let norm = grad_norm(model, grads);
        self.t += 1;
        let step = AdamStep {
            t: self.t,
            lr,
            betas: self.config.betas,
            eps: self.config.eps,
            weight_decay: Some(self.config.weight_decay),
            grad_scale: max_norm
                .filter(|&max| norm > max)
                .map(|max| max / (norm + 1e-6)),
        };
        struct Update<'a, D: Device<f32>> {
            state: &'a mut AdamState<D>,
            grads: &'a mut Gradients<f32, D>,
            step: AdamStep,
        }
        impl<D: Buffers> ParamVisitor<D> for Update<'_, D> {
            fn visit<S: Shape>(&mut self, _: &str, p: &mut Tensor<S, f32, D>, trainable: bool) {
                if !trainable {
                    return;
                }
                let g = self.grads.get_or_alloc_mut(&*p).expect("gradient buffer");
                // Weight decay on matrices only, not on biases and LayerNorm gains (as GPT-2
                // and nanoGPT train).
                let mut step = self.step;
                if S::NUM_DIMS < 2 {
                    step.weight_decay = None;
                }
                p.device().clone().adamw(p, g, self.state, &step);
            }
        }
        model.visit(&mut Update {
            state: &mut self.state,
            grads,
            step,
        });
        // In parallel: each update is itself parallel, and the copies into the tensors (one
        // thread each) overlap with other parameters' updates.
        std::mem::take(&mut self.state.deferred)
            .into_par_iter()
            .for_each(|update| update());
        self.state.master_current = true;
        norm
    }

    /// The moments of every trainable parameter, by name with `.m` / `.v` suffixes.
    pub fn moments(&mut self, model: &mut impl Visit<D>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        struct Read<'a, D: Device<f32>>(&'a mut AdamW<D>, Vec<(String, Vec<usize>, Vec<f32>)>);
        impl<D: Buffers> ParamVisitor<D> for Read<'_, D> {
            fn visit<S: Shape>(&mut self, name: &str, p: &mut Tensor<S, f32, D>, trainable: bool) {
                if !trainable {
                    return;
                }
                let shape: Vec<usize> = p.shape().concrete().into_iter().collect();
                let device = p.device().clone();
                let m =
                    device.download(self.0.state.m.get_or_alloc_mut(&*p).expect("moment buffer"));
                let v =
                    device.download(self.0.state.v.get_or_alloc_mut(&*p).expect("moment buffer"));
                self.1.push((format!("{name}.m"), shape.clone(), m));
                self.1.push((format!("{name}.v"), shape, v));
            }
        }
        let mut read = Read(self, Vec::new());
        model.visit(&mut read);
        read.1
    }

    /// Restores moments saved by [`AdamW::moments`]; `find` looks one up by name.
    pub fn restore(
        &mut self,
        model: &mut impl Visit<D>,
        t: i32,
        find: &dyn Fn(&str) -> Option<Vec<f32>>,
    ) -> Result<(), String> {
        self.t = t;
        struct Write<'a, D: Device<f32>> {
            optimizer: &'a mut AdamW<D>,
            find: &'a dyn Fn(&str) -> Option<Vec<f32>>,
            missing: Vec<String>,
        }
        impl<D: Buffers> ParamVisitor<D> for Write<'_, D> {
            fn visit<S: Shape>(&mut self, name: &str, p: &mut Tensor<S, f32, D>, trainable: bool) {
                if !trainable {
                    return;
                }
                let device = p.device().clone();
                let n = p.shape().num_elements();
                for (suffix, moments) in [
                    ("m", &mut self.optimizer.state.m),
                    ("v", &mut self.optimizer.state.v),
                ] {
                    match (self.find)(&format!("{name}.{suffix}")).filter(|data| data.len() == n) {
                        Some(data) => device
                            .upload(&data, moments.get_or_alloc_mut(&*p).expect("moment buffer")),
                        None => self.missing.push(format!("{name}.{suffix}")),
                    }
                }
            }
        }
        let mut write = Write {
            optimizer: self,
            find,
            missing: Vec::new(),
        };
        model.visit(&mut write);
        if write.missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the checkpoint lacks optimizer state {}",
                write.missing.join(", ")
            ))
        }
    }
}

/// The global L2 norm of the trainable parameters' gradients.
pub fn grad_norm<D: Kernels>(model: &mut impl Visit<D>, grads: &mut Gradients<f32, D>) -> f32 {
    struct Norm<'a, D: Device<f32>>(&'a mut Gradients<f32, D>, f64);
    impl<D: Buffers> ParamVisitor<D> for Norm<'_, D> {
        fn visit<S: Shape>(&mut self, _: &str, p: &mut Tensor<S, f32, D>, trainable: bool) {
            if trainable {
                let g = self.0.get_or_alloc_mut(&*p).expect("gradient buffer");
                self.1 += p.device().sum_squares(g);
            }
        }
    }
    let mut norm = Norm(grads, 0.0);
    model.visit(&mut norm);
    norm.1.sqrt() as f32
}

/// How a micro-batch's gradients join the step's.
#[derive(Clone, Copy, PartialEq)]
pub enum Join {
    /// The step's first micro-batch: `into = by·from`, by moving `from`'s buffers into `into`
    /// (`into`'s, empty or not, go to `from`, to be dropped with it).
    Take,
    /// A later one: `into += by·from`. Adding micro-batches this way lets each one's own
    /// gradients (and its activations' gradients) be freed.
    Add,
}

/// Joins `from`, times `by`, to `into` for every trainable parameter.
pub fn join<D: Kernels>(
    model: &mut impl Visit<D>,
    into: &mut Gradients<f32, D>,
    from: &mut Gradients<f32, D>,
    by: f32,
    how: Join,
) {
    struct Visit<'a, D: Device<f32>> {
        into: &'a mut Gradients<f32, D>,
        from: &'a mut Gradients<f32, D>,
        by: f32,
        how: Join,
    }
    impl<D: Buffers> ParamVisitor<D> for Visit<'_, D> {
        fn visit<S: Shape>(&mut self, _: &str, p: &mut Tensor<S, f32, D>, trainable: bool) {
            if !trainable {
                return;
            }
            let device = p.device().clone();
            let from = self.from.get_or_alloc_mut(&*p).expect("gradient buffer");
            let into = self.into.get_or_alloc_mut(&*p).expect("gradient buffer");
            match self.how {
                Join::Take => {
                    std::mem::swap(into, from);
                    if self.by != 1.0 {
                        device.scale(into, self.by);
                    }
                }
                Join::Add => device.add_scaled(into, from, self.by),
            }
        }
    }
    model.visit(&mut Visit {
        into,
        from,
        by,
        how,
    });
}

/// Frees the trainable parameters' buffers in `grads`, keeping empty ones in their place (for
/// the next step's [`Join::Take`], which then allocates nothing). False where the device keeps
/// them (see [`Buffers::release`]).
pub fn release<D: Kernels>(model: &mut impl Visit<D>, grads: &mut Gradients<f32, D>) -> bool {
    struct Release<'a, D: Device<f32>>(&'a mut Gradients<f32, D>, bool);
    impl<D: Buffers> ParamVisitor<D> for Release<'_, D> {
        fn visit<S: Shape>(&mut self, _: &str, p: &mut Tensor<S, f32, D>, trainable: bool) {
            if trainable {
                let g = self.0.get_or_alloc_mut(&*p).expect("gradient buffer");
                self.1 &= p.device().release(g);
            }
        }
    }
    let mut release = Release(grads, true);
    model.visit(&mut release);
    release.1
}
