//! AdamW with global-norm clipping and gradient accumulation, over the [`ParamVisitor`].
//!
//! dfdx 0.13's optimizers need compile-time shapes, but its fused Adam kernel
//! (`AdamConfig::try_update`) is shape-generic, so the update itself is dfdx's; this module adds
//! what dfdx lacks: clipping, accumulation, and moments that can be saved and restored.

use dfdx::prelude::*;

use super::gpt::{Gpt, ParamVisitor};
use super::kernels::Kernels;

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
}

impl Buffers for Cpu {
    fn sum_squares(&self, g: &<Self as Storage<f32>>::Vec) -> f64 {
        g.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
    }

    fn scale(&self, g: &mut <Self as Storage<f32>>::Vec, by: f32) {
        g.iter_mut().for_each(|x| *x *= by);
    }

    fn add_scaled(
        &self,
        into: &mut <Self as Storage<f32>>::Vec,
        from: &<Self as Storage<f32>>::Vec,
        by: f32,
    ) {
        into.iter_mut()
            .zip(from.iter())
            .for_each(|(a, b)| *a += b * by);
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
}

#[cfg(feature = "cuda")]
impl Buffers for Cuda {
    // Through host memory: O(parameters) per step, small next to the step's GEMMs.
    fn sum_squares(&self, g: &<Self as Storage<f32>>::Vec) -> f64 {
        self.download(g)
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum()
    }

    fn scale(&self, g: &mut <Self as Storage<f32>>::Vec, by: f32) {
        let host: Vec<f32> = self.download(g).into_iter().map(|x| x * by).collect();
        self.upload(&host, g);
    }

    fn add_scaled(
        &self,
        into: &mut <Self as Storage<f32>>::Vec,
        from: &<Self as Storage<f32>>::Vec,
        by: f32,
    ) {
        let from = self.download(from);
        let sum: Vec<f32> = self
            .download(into)
            .iter()
            .zip(&from)
            .map(|(a, b)| a + b * by)
            .collect();
        self.upload(&sum, into);
    }

    fn add_host(&self, into: &mut <Self as Storage<f32>>::Vec, host: &[f32]) {
        let sum: Vec<f32> = self
            .download(into)
            .iter()
            .zip(host)
            .map(|(a, b)| a + b)
            .collect();
        self.upload(&sum, into);
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
}

/// Optimizer settings.
#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW<D: Device<f32>> {
    pub config: AdamWConfig,
    /// Updates done so far (Adam's bias correction needs it).
    pub t: i32,
    m: Gradients<f32, D>,
    v: Gradients<f32, D>,
}

impl<D: Kernels> AdamW<D> {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            t: 0,
            m: Gradients::leaky(),
            v: Gradients::leaky(),
        }
    }

    /// Clips `grads` to `max_norm` (global L2 norm, when given) and applies one AdamW update
    /// with learning rate `lr`. Returns the norm before clipping.
    pub fn step(
        &mut self,
        model: &mut Gpt<D>,
        grads: &mut Gradients<f32, D>,
        lr: f64,
        max_norm: Option<f32>,
    ) -> f32 {
        let norm = grad_norm(model, grads);
        let clip = max_norm
            .filter(|&max| norm > max)
            .map(|max| max / (norm + 1e-6));
        self.t += 1;
        let adam = AdamConfig {
            lr,
            betas: self.config.betas,
            eps: self.config.eps,
            weight_decay: Some(WeightDecay::Decoupled(self.config.weight_decay)),
        };
        struct Update<'a, D: Device<f32>> {
            optimizer: &'a mut AdamW<D>,
            grads: &'a mut Gradients<f32, D>,
            adam: AdamConfig,
            clip: Option<f32>,
        }
        impl<D: Buffers> ParamVisitor<D> for Update<'_, D> {
            fn visit<S: Shape>(&mut self, _: &str, p: &mut Tensor<S, f32, D>, trainable: bool) {
                if !trainable {
                    return;
                }
                let device = p.device().clone();
                let g = self.grads.get_or_alloc_mut(&*p).expect("gradient buffer");
                if let Some(by) = self.clip {
                    device.scale(g, by);
                }
                // Weight decay on matrices only, not on biases and LayerNorm gains (as GPT-2
                // and nanoGPT train).
                let mut adam = self.adam;
                if S::NUM_DIMS < 2 {
                    adam.weight_decay = None;
                }
                let m = self
                    .optimizer
                    .m
                    .get_or_alloc_mut(&*p)
                    .expect("moment buffer");
                let v = self
                    .optimizer
                    .v
                    .get_or_alloc_mut(&*p)
                    .expect("moment buffer");
                adam.try_update(self.optimizer.t, p, m, v, g)
                    .expect("AdamW update");
            }
        }
        model.visit(&mut Update {
            optimizer: self,
            grads,
            adam,
            clip,
        });
        norm
    }

    /// The moments of every trainable parameter, by name with `.m` / `.v` suffixes.
    pub fn moments(&mut self, model: &mut Gpt<D>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        struct Read<'a, D: Device<f32>>(&'a mut AdamW<D>, Vec<(String, Vec<usize>, Vec<f32>)>);
        impl<D: Buffers> ParamVisitor<D> for Read<'_, D> {
            fn visit<S: Shape>(&mut self, name: &str, p: &mut Tensor<S, f32, D>, trainable: bool) {
                if !trainable {
                    return;
                }
                let shape: Vec<usize> = p.shape().concrete().into_iter().collect();
                let device = p.device().clone();
                let m = device.download(self.0.m.get_or_alloc_mut(&*p).expect("moment buffer"));
                let v = device.download(self.0.v.get_or_alloc_mut(&*p).expect("moment buffer"));
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
        model: &mut Gpt<D>,
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
                for (suffix, moments) in
                    [("m", &mut self.optimizer.m), ("v", &mut self.optimizer.v)]
                {
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
pub fn grad_norm<D: Kernels>(model: &mut Gpt<D>, grads: &mut Gradients<f32, D>) -> f32 {
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

/// Adds `from * by` into `into` for every trainable parameter: accumulating micro-batches this
/// way lets each micro-batch's own gradients (and its activations' gradients) be freed.
pub fn accumulate<D: Kernels>(
    model: &mut Gpt<D>,
    into: &mut Gradients<f32, D>,
    from: &mut Gradients<f32, D>,
    by: f32,
) {
    struct Add<'a, D: Device<f32>>(&'a mut Gradients<f32, D>, &'a mut Gradients<f32, D>, f32);
    impl<D: Buffers> ParamVisitor<D> for Add<'_, D> {
        fn visit<S: Shape>(&mut self, _: &str, p: &mut Tensor<S, f32, D>, trainable: bool) {
            if trainable {
                let device = p.device().clone();
                let from = self.1.get_or_alloc_mut(&*p).expect("gradient buffer");
                let into = self.0.get_or_alloc_mut(&*p).expect("gradient buffer");
                device.add_scaled(into, from, self.2);
            }
        }
    }
    model.visit(&mut Add(into, from, by));
}
