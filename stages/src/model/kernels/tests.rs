//! Every fused CPU kernel against the plain dfdx composition of the same maths: values and
//! the gradients of every input, on random inputs with odd sizes (no multiple of a vector's
//! width anywhere), to a relative error of 1e-5 (largest difference over largest value).

use dfdx::prelude::*;

use super::composed;
use super::{autocast, Dense, Epilogue, Kernels, Precision};
use crate::model::layers::{A2, P1, P2};

type Taped = OwnedTape<f32, Cpu>;

const TOLERANCE: f32 = 1e-5;

/// Reads one tensor's gradient.
type GradReader<'a> = &'a dyn Fn(&Gradients<f32, Cpu>) -> Vec<f32>;

fn assert_close(what: &str, got: &[f32], expected: &[f32]) {
    assert_eq!(got.len(), expected.len(), "{what}: lengths");
    let scale = expected.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let worst = got
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= TOLERANCE * scale.max(f32::MIN_POSITIVE),
        "{what}: worst difference {worst:e} against values up to {scale:e}"
    );
    assert!(
        scale > 0.0,
        "{what}: all zero, so the comparison proves nothing"
    );
}

/// A scalar loss that weighs every output element differently, so each gets its own gradient.
fn weighted_sum<S: Shape>(
    y: Tensor<S, f32, Cpu, Taped>,
    seed: u64,
) -> Tensor<Rank0, f32, Cpu, Taped> {
    let dev = Cpu::seed_from_u64(seed);
    let weights: Tensor<S, f32, Cpu> = dev.sample_normal_like(y.shape());
    (y * weights).sum::<Rank0, _>()
}

fn random2(dev: &Cpu, rows: usize, cols: usize) -> P2<Cpu> {
    dev.sample_normal_like(&(rows, cols))
}

fn random1(dev: &Cpu, len: usize) -> P1<Cpu> {
    dev.sample_normal_like(&(len,))
}

/// The output of `op` on `x`, and the gradients of `x` and of each of `params`.
fn run(
    x: &P2<Cpu>,
    params: &[GradReader],
    op: impl FnOnce(A2<Cpu, Taped>) -> A2<Cpu, Taped>,
) -> Vec<Vec<f32>> {
    let y = op(x.leaky_trace());
    let values = y.as_vec();
    let grads = weighted_sum(y, 99).backward();
    let mut out = vec![values, grads.get(x).as_vec()];
    out.extend(params.iter().map(|p| p(&grads)));
    out
}

fn compare(what: &str, fused: Vec<Vec<f32>>, reference: Vec<Vec<f32>>) {
    let names = ["output", "input gradient"];
    for (i, (f, r)) in fused.iter().zip(&reference).enumerate() {
        let name = names.get(i).map_or_else(
            || format!("parameter {} gradient", i - 1),
            |n| n.to_string(),
        );
        assert_close(&format!("{what}: {name}"), f, r);
    }
}

/// Whether `t`'s gradient is absent or all zero.
fn no_gradient<S: Shape>(grads: &mut Gradients<f32, Cpu>, t: &Tensor<S, f32, Cpu>) -> bool {
    grads.get_or_alloc_mut(t).unwrap().iter().all(|&g| g == 0.0)
}

fn grad_of<S: Shape>(t: &Tensor<S, f32, Cpu>) -> impl Fn(&Gradients<f32, Cpu>) -> Vec<f32> + '_ {
    move |grads| grads.get(t).as_vec()
}

#[test]
fn linear_matches_dfdx_with_every_epilogue_and_layout() {
    let dev = Cpu::seed_from_u64(1);
    let (n, inputs, outputs) = (13, 11, 19);
    let x = random2(&dev, n, inputs);
    let bias = random1(&dev, outputs);
    let residual = random2(&dev, n, outputs);
    for transposed in [false, true] {
        let weight = if transposed {
            random2(&dev, outputs, inputs)
        } else {
            random2(&dev, inputs, outputs)
        };
        for epilogue in ["plain", "gelu", "residual"] {
            let dense = Dense {
                weight: &weight,
                transposed,
                bias: Some(&bias),
                train: true,
            };
            let with = |x: A2<Cpu, Taped>, fused: bool| {
                let epilogue = match epilogue {
                    "plain" => Epilogue::Plain,
                    "gelu" => Epilogue::Gelu,
                    _ => Epilogue::AddTo(residual.clone().put_tape(Taped::default())),
                };
                if fused {
                    Cpu::linear(x, &dense, epilogue)
                } else {
                    composed::linear(x, &dense, epilogue)
                }
            };
            let params: [GradReader; 3] = [&grad_of(&weight), &grad_of(&bias), &grad_of(&residual)];
            let params = if epilogue == "residual" {
                &params[..]
            } else {
                &params[..2]
            };
            let what = format!("linear ({epilogue}, transposed {transposed})");
            compare(
                &what,
                run(&x, params, |x| with(x, true)),
                run(&x, params, |x| with(x, false)),
            );
        }
    }
}

/// How a block's op is run: fused, as the separate CPU kernels, or as the dfdx composition.
#[derive(Clone, Copy, PartialEq)]
enum Run {
    Fused,
    Kernels,
    Composed,
}

/// A two-layer block (`first`, `(d, first_out)`, then `second`, `(second_in, d)`, with the
/// residual add) against its separate kernels, bit for bit, and against the dfdx composition,
/// with and without trained layers.
fn check_block(
    what: &str,
    (n, d, first_out, second_in): (usize, usize, usize, usize),
    block: impl Fn(Run, A2<Cpu, Taped>, &Dense<Cpu>, &Dense<Cpu>, A2<Cpu, Taped>) -> A2<Cpu, Taped>,
) {
    let dev = Cpu::seed_from_u64(2);
    let x = random2(&dev, n, d);
    let (first_weight, first_bias) = (random2(&dev, d, first_out), random1(&dev, first_out));
    let (second_weight, second_bias) = (random2(&dev, second_in, d), random1(&dev, d));
    let residual = random2(&dev, n, d);
    for train in [true, false] {
        let dense = |weight, bias| Dense {
            weight,
            transposed: false,
            bias: Some(bias),
            train,
        };
        let (first, second) = (
            dense(&first_weight, &first_bias),
            dense(&second_weight, &second_bias),
        );
        let residual_grad = grad_of(&residual);
        let mut params: Vec<GradReader> = vec![&residual_grad];
        let (first_w, first_b) = (grad_of(&first_weight), grad_of(&first_bias));
        let (second_w, second_b) = (grad_of(&second_weight), grad_of(&second_bias));
        if train {
            params.extend([&first_w as GradReader, &first_b, &second_w, &second_b]);
        }
        let with = |how| {
            run(&x, &params, |x| {
                let residual = residual.clone().put_tape(Taped::default());
                block(how, x, &first, &second, residual)
            })
        };
        let fused = with(Run::Fused);
        // The same kernels in the same order: the same bits, so fusing changes no result.
        assert!(
            fused == with(Run::Kernels),
            "{what} (train {train}): not the bits of its separate kernels"
        );
        compare(
            &format!("{what} (train {train})"),
            fused,
            with(Run::Composed),
        );
        if !train {
            let residual = residual.clone().put_tape(Taped::default());
            let y = block(Run::Fused, x.leaky_trace(), &first, &second, residual);
            let mut grads = weighted_sum(y, 99).backward();
            assert!(
                no_gradient(&mut grads, &first_weight) && no_gradient(&mut grads, &second_bias),
                "{what}: frozen layers got gradients"
            );
        }
    }
}

#[test]
fn mlp_matches_two_linear_layers_and_their_bits() {
    check_block("mlp", (13, 11, 37, 37), |how, x, fc, proj, residual| {
        let linear = match how {
            Run::Fused => return Cpu::mlp(x, fc, proj, residual),
            Run::Kernels => Cpu::linear,
            Run::Composed => composed::linear,
        };
        let hidden = linear(x, fc, Epilogue::Gelu);
        linear(hidden, proj, Epilogue::AddTo(residual))
    });
}

#[test]
fn attention_block_matches_its_three_kernels_and_their_bits() {
    // Batch 2, seq 9, 2 heads of 5: rows 18, d 10, q, k and v 30 wide.
    let (batch, heads) = (2, 2);
    check_block(
        "attention block",
        (18, 10, 30, 10),
        |how, x, c_attn, c_proj, residual| match how {
            Run::Fused => Cpu::attention_block(x, c_attn, c_proj, residual, (batch, heads)),
            Run::Kernels => {
                let qkv = Cpu::linear(x, c_attn, Epilogue::Plain);
                let y = Cpu::causal_attention(qkv, batch, heads);
                Cpu::linear(y, c_proj, Epilogue::AddTo(residual))
            }
            Run::Composed => {
                let qkv = composed::linear(x, c_attn, Epilogue::Plain);
                let y = composed::causal_attention(qkv, batch, heads);
                composed::linear(y, c_proj, Epilogue::AddTo(residual))
            }
        },
    );
}

/// Largest difference over largest value.
fn relative_difference(got: &[f32], expected: &[f32]) -> f32 {
    let scale = expected.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let worst = got
        .iter()
        .zip(expected)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    worst / scale
}

#[test]
fn linear_in_bf16_stays_within_bf16_rounding_of_f32_forward_and_backward() {
    let dev = Cpu::seed_from_u64(12);
    let (n, inputs, outputs) = (37, 45, 29);
    let x = random2(&dev, n, inputs);
    let (bias, residual) = (random1(&dev, outputs), random2(&dev, n, outputs));
    for transposed in [false, true] {
        let weight = match transposed {
            true => random2(&dev, outputs, inputs),
            false => random2(&dev, inputs, outputs),
        };
        let dense = Dense {
            weight: &weight,
            transposed,
            bias: Some(&bias),
            train: true,
        };
        for epilogue in ["plain", "gelu", "residual"] {
            let params: [GradReader; 2] = [&grad_of(&weight), &grad_of(&bias)];
            // The forward pass alone sets the precision: the backward pass, run after the
            // guard is gone, must keep it.
            let linear = |precision| {
                run(&x, &params, |x| {
                    let _precision = autocast(precision);
                    let epilogue = match epilogue {
                        "plain" => Epilogue::Plain,
                        "gelu" => Epilogue::Gelu,
                        _ => Epilogue::AddTo(residual.clone().put_tape(Taped::default())),
                    };
                    Cpu::linear(x, &dense, epilogue)
                })
            };
            let (bf16, f32) = (linear(Precision::Bf16), linear(Precision::F32));
            let names = [
                "output",
                "input gradient",
                "weight gradient",
                "bias gradient",
            ];
            for ((name, b), f) in names.iter().zip(&bf16).zip(&f32) {
                let what = format!("bf16 linear ({epilogue}, transposed {transposed}): {name}");
                let difference = relative_difference(b, f);
                // bf16 keeps 8 significant bits: each product is off by up to 2⁻⁸ relative.
                assert!(difference < 1e-2, "{what}: {difference:e} from f32");
                // The bias gradient sums the output gradient, which no product touches.
                if *name != "bias gradient" {
                    assert!(
                        difference > 1e-5,
                        "{what}: equal to f32, so bf16 did not run"
                    );
                }
            }
        }
    }
}

#[test]
fn frozen_linear_gives_the_input_gradient_only() {
    let dev = Cpu::seed_from_u64(2);
    let (x, weight, bias) = (random2(&dev, 9, 5), random2(&dev, 5, 7), random1(&dev, 7));
    let dense = |train| Dense {
        weight: &weight,
        transposed: false,
        bias: Some(&bias),
        train,
    };
    let frozen = run(&x, &[], |x| Cpu::linear(x, &dense(false), Epilogue::Plain));
    let trained = run(&x, &[], |x| Cpu::linear(x, &dense(true), Epilogue::Plain));
    assert_eq!(frozen, trained, "the same output and input gradient");
    let reference = run(&x, &[], |x| {
        composed::linear(x, &dense(false), Epilogue::Plain)
    });
    compare("frozen linear", frozen, reference);
    let y = Cpu::linear(x.leaky_trace(), &dense(false), Epilogue::Plain);
    let mut grads = weighted_sum(y, 3).backward();
    assert!(no_gradient(&mut grads, &weight) && no_gradient(&mut grads, &bias));
    // The composition's frozen matmul skips the weight's gradient too.
    let y = composed::linear(x.leaky_trace(), &dense(false), Epilogue::Plain);
    let mut grads = weighted_sum(y, 3).backward();
    assert!(no_gradient(&mut grads, &weight));
}

#[test]
fn gelu_matches_dfdx() {
    let dev = Cpu::seed_from_u64(3);
    // Wide inputs reach both tails, where GELU is ~0 and ~x.
    let x: P2<Cpu> = dev.sample_normal_like(&(7, 29)) * 3.0;
    compare(
        "gelu",
        run(&x, &[], Cpu::gelu),
        run(&x, &[], |x| x.fast_gelu()),
    );
}

#[test]
fn layer_norm_matches_dfdx() {
    let dev = Cpu::seed_from_u64(4);
    // An offset and scale per row, as residual streams have.
    let x: P2<Cpu> = dev.sample_normal_like(&(11, 37)) * 2.5 + 0.75;
    let (weight, bias) = (random1(&dev, 37), random1(&dev, 37));
    let params: [GradReader; 2] = [&grad_of(&weight), &grad_of(&bias)];
    compare(
        "layer norm",
        run(&x, &params, |x| Cpu::layer_norm(x, &weight, &bias, true)),
        run(&x, &params, |x| composed::layer_norm(x, &weight, &bias)),
    );
}

#[test]
fn causal_attention_matches_dfdx() {
    let dev = Cpu::seed_from_u64(5);
    // Partial tiles of rows and columns (the products' tiles are 8 × 32 and skip the upper
    // triangle), and (last) whole ones with two column tiles.
    for (batch, seq, heads, head) in [(3, 7, 3, 5), (2, 77, 2, 3), (2, 130, 2, 40)] {
        let d = heads * head;
        let qkv: P2<Cpu> = dev.sample_normal_like(&(batch * seq, 3 * d)) * 1.5;
        compare(
            &format!("causal attention, seq {seq}"),
            run(&qkv, &[], |x| Cpu::causal_attention(x, batch, heads)),
            run(&qkv, &[], |x| composed::causal_attention(x, batch, heads)),
        );
    }
}

#[test]
fn head_log_probs_match_dfdx_and_masked_rows_get_no_gradient() {
    let dev = Cpu::seed_from_u64(6);
    let (n, d, vocab) = (13, 9, 101);
    let x: P2<Cpu> = dev.sample_normal_like(&(n, d)) * 2.0;
    let targets: Vec<usize> = (0..n).map(|i| (i * 37 + 5) % vocab).collect();
    let targets = dev.tensor_from_vec(targets, (n,));
    // Rows with mask 0 contribute nothing (the fused kernel zeroes them).
    let mask: Vec<f32> = (0..n).map(|i| u8::from(i % 3 != 0).into()).collect();
    let mask = dev.tensor_from_vec(mask, (n,));
    for (transposed, train) in [(false, true), (true, true), (true, false)] {
        let weight = if transposed {
            random2(&dev, vocab, d)
        } else {
            random2(&dev, d, vocab)
        };
        let head = Dense {
            weight: &weight,
            transposed,
            bias: None,
            train,
        };
        let run = |fused: bool| {
            let traced = x.leaky_trace();
            let log_probs = if fused {
                Cpu::head_log_probs(traced, &head, targets.clone())
            } else {
                composed::head_log_probs(traced, &head, targets.clone())
            };
            let values = log_probs.as_vec();
            let mut grads = weighted_sum(log_probs * mask.clone(), 7).backward();
            let grad_w = grads.get_or_alloc_mut(&weight).unwrap().to_vec();
            (values, grads.get(&x).as_vec(), grad_w)
        };
        let what = format!("head log-probs (transposed {transposed}, train {train})");
        let (fused, reference) = (run(true), run(false));
        assert_close(&format!("{what}: values"), &fused.0, &reference.0);
        assert_close(&format!("{what}: input gradient"), &fused.1, &reference.1);
        if train {
            assert_close(&format!("{what}: weight gradient"), &fused.2, &reference.2);
        } else {
            assert!(
                fused.2.iter().all(|&g| g == 0.0),
                "{what}: a frozen head gets no gradient"
            );
        }
        let log_probs = Cpu::head_log_probs(x.leaky_trace(), &head, targets.clone());
        let grads = weighted_sum(log_probs * mask.clone(), 7).backward();
        assert!(
            grads.get(&x).as_vec()[..d].iter().all(|&g| g == 0.0),
            "row 0 is masked"
        );
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let dev = Cpu::seed_from_u64(8);
    // Enough rows for several parallel tasks in each kernel.
    let (batch, seq, heads, d) = (4, 64, 4, 64);
    let x: P2<Cpu> = dev.sample_normal_like(&(batch * seq, d));
    let (ln_w, ln_b) = (random1(&dev, d), random1(&dev, d));
    let (w_qkv, w_out) = (random2(&dev, d, 3 * d), random2(&dev, d, d));
    let (b_qkv, b_out) = (random1(&dev, 3 * d), random1(&dev, d));
    let step = |precision| {
        let _precision = autocast(precision);
        let h = Cpu::layer_norm(x.leaky_trace(), &ln_w, &ln_b, true);
        let dense = |weight, bias| Dense {
            weight,
            transposed: false,
            bias: Some(bias),
            train: true,
        };
        let qkv = Cpu::linear(h, &dense(&w_qkv, &b_qkv), Epilogue::Plain);
        let y = Cpu::causal_attention(qkv, batch, heads);
        let y = Cpu::linear(y, &dense(&w_out, &b_out), Epilogue::Gelu);
        let grads = weighted_sum(y, 9).backward();
        [
            grads.get(&ln_w).as_vec(),
            grads.get(&ln_b).as_vec(),
            grads.get(&w_qkv).as_vec(),
            grads.get(&w_out).as_vec(),
            grads.get(&b_qkv).as_vec(),
        ]
        .concat()
    };
    let on = |threads, precision| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| step(precision))
    };
    for precision in [Precision::F32, Precision::Bf16] {
        assert_eq!(
            on(1, precision),
            on(3, precision),
            "bit-identical {precision:?} gradients on 1 and 3 threads"
        );
    }
}

/// The kernels write gradients through raw slices, sound only for distinct tensors: an op given
/// one tensor twice must stop, not alias.
#[test]
#[should_panic(expected = "an op's tensors must be distinct")]
fn an_op_given_the_same_tensor_twice_stops() {
    let dev = Cpu::seed_from_u64(10);
    let (x, weight) = (random2(&dev, 4, 6), random2(&dev, 6, 6));
    let dense = Dense {
        weight: &weight,
        transposed: false,
        bias: None,
        train: true,
    };
    let traced = x.leaky_trace();
    // The residual is the input itself (same id).
    let y = Cpu::linear(traced.with_empty_tape(), &dense, Epilogue::AddTo(traced));
    let _ = weighted_sum(y, 11).backward();
}
