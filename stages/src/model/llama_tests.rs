//! The engine on Llama-family models: gradients, checkpoints, adapters and exports, each as
//! GPT-2's are tested (`tests` in mod.rs), and against transformers and peft where they load it.

use std::path::Path;

use dfdx::prelude::*;

use super::llama::{LlamaConfig, Member};
use super::tests::{
    adamw, batch_ids, check_against_finite_differences, fixture_logits, lora, train_three_steps,
    worst_difference, Pick,
};
use super::*;

/// A tiny Llama: grouped-query attention (4 heads on 2 k/v heads), a head_dim (4) that makes q
/// wider than the hidden size (16 on 8), biases on every attention projection.
fn tiny_llama(tied: bool) -> LlamaConfig {
    LlamaConfig {
        member: Member::Llama,
        vocab_size: 16,
        hidden_size: 8,
        intermediate_size: 12,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        attention_bias: true,
        output_bias: true,
        mlp_bias: false,
        tie_word_embeddings: tied,
        max_position_embeddings: 8,
        sliding_window: None,
        first_window_layer: 0,
    }
}

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

#[test]
fn gradients_match_finite_differences() {
    for tied in [true, false] {
        let config = LlamaConfig {
            vocab_size: 11,
            ..tiny_llama(tied)
        };
        let mut engine = Engine::new(Cpu::seed_from_u64(3), config.into(), adamw());
        let (inputs, targets) = batch_ids();
        let batch = Batch {
            inputs: &inputs,
            targets: &targets,
            mask: None,
            batch: 2,
            seq: 6,
        };
        engine.accumulate(&batch, 1.0, 0);
        let matrices: [(&str, Pick); 4] = [
            ("embed_tokens", |m| &mut m.llama().embed_tokens),
            ("layers.0.self_attn.k_proj", |m| {
                &mut m.llama().layers[0].self_attn.k_proj.weight
            }),
            ("layers.1.self_attn.q_proj", |m| {
                &mut m.llama().layers[1].self_attn.q_proj.weight
            }),
            ("layers.0.mlp.down_proj", |m| {
                &mut m.llama().layers[0].mlp.down_proj.weight
            }),
        ];
        let case = format!("tied {tied}");
        check_against_finite_differences(&mut engine, &batch, &matrices, (4, 0.0), &case);
    }
}

/// transformers' own files, through the path every stage takes (config.json's `model_type`
/// picks the architecture).
#[test]
fn transformers_checkpoints_load_through_the_trainer() {
    for name in ["llama-gqa-tied", "llama3-rope-bias", "qwen2", "mistral-window"] {
        let dir = fixtures().join(name);
        let (mut model, eos) = Trainer::load(&dir, DeviceKind::Cpu, adamw()).unwrap();
        assert_eq!(eos, Some(1), "{name}");
        let fixture: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("logits.json")).unwrap()).unwrap();
        let ids: Vec<u32> = fixture["ids"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32))
            .collect();
        let expected: Vec<f32> = fixture["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s.as_array().unwrap())
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32))
            .collect();
        let worst = worst_difference(&model.logits(&ids, 2, 8), &expected);
        assert!(worst < 2e-5, "{name}: logits differ by up to {worst}");
    }
}

/// A tiny Llama after three optimizer steps, so that norms and biases moved from their starts.
fn trained_llama() -> Trainer {
    let mut model = Trainer::new(tiny_llama(false), DeviceKind::Cpu, 11, adamw()).unwrap();
    train_three_steps(&mut model, (7, 5));
    model
}

#[test]
fn a_saved_llama_loads_back_bit_for_bit() {
    let mut model = trained_llama();
    let out = tempfile::tempdir().unwrap();
    model.save_hf(out.path(), 1).unwrap();
    let (mut loaded, eos) = Trainer::load(out.path(), DeviceKind::Cpu, adamw()).unwrap();
    assert_eq!(eos, Some(1));
    assert_eq!(loaded.config(), model.config());
    assert_eq!(loaded.weights(), model.weights());
}

/// Writes tests/fixtures/llama-smelt-export (run by make_llama_fixture.py, which then adds the
/// logits transformers computes for it).
#[test]
#[ignore]
fn write_llama_export_fixture() {
    let dir = fixtures().join("llama-smelt-export");
    std::fs::create_dir_all(&dir).unwrap();
    trained_llama().save_hf(&dir, 1).unwrap();
}

/// A Llama smelt exports gives, in transformers, the logits smelt computes.
#[test]
fn exported_llamas_give_the_logits_transformers_computes() {
    let dir = fixtures().join("llama-smelt-export");
    let (ids, reference) = fixture_logits(&dir);
    let out = tempfile::tempdir().unwrap();
    trained_llama().save_hf(out.path(), 1).unwrap();
    let (mut model, _) = Trainer::load(out.path(), DeviceKind::Cpu, adamw()).unwrap();
    let worst = worst_difference(&model.logits(&ids, 2, 8), &reference);
    assert!(
        worst < 1e-4,
        "logits differ from transformers' by up to {worst}"
    );
}

#[test]
fn adapters_target_the_llama_projections_by_their_hf_names() {
    let mut model = trained_llama();
    let (inputs, _) = batch_ids();
    let before = model.logits(&inputs, 2, 6);
    let all = lora(&LoraTarget::LLAMA);
    model.add_lora(&all, 3).unwrap();
    // B = 0: the adapted model is the base model, bit for bit.
    assert_eq!(model.logits(&inputs, 2, 6), before);
    let names: Vec<String> = model
        .weights()
        .into_iter()
        .map(|(name, _, _)| name)
        .filter(|name| name.starts_with("model.layers.1.") && name.contains("lora_A"))
        .collect();
    let expected = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    .map(|m| format!("model.layers.1.{m}.lora_A"));
    assert_eq!(names, expected);
    // Only the adapters train, and merging keeps what they learnt.
    let frozen = model.weights();
    train_three_steps(&mut model, (3, 11));
    for ((name, _, after), (_, _, was)) in model.weights().iter().zip(&frozen) {
        match name.contains("lora_B") {
            true => assert_ne!(after, was, "{name} did not train"),
            false if !name.contains("lora_") => assert_eq!(after, was, "{name} trained"),
            false => {}
        }
    }
    let adapted = model.logits(&inputs, 2, 6);
    model.merge_lora();
    let worst = worst_difference(&model.logits(&inputs, 2, 6), &adapted);
    assert!(worst < 1e-5, "merging changed the logits by up to {worst}");
}

#[test]
fn a_gpt_target_on_a_llama_is_refused_naming_the_llama_ones() {
    let mut model = trained_llama();
    let err = model
        .add_lora(&lora(&[LoraTarget::AttnCAttn]), 3)
        .unwrap_err();
    assert_eq!(
        err,
        "a Llama-family model has no `attn.c_attn` layers to adapt: its targets are q_proj, \
         k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    );
}

/// The trained tiny Llama with adapters on q_proj, v_proj and down_proj, trained three steps.
fn adapted_llama() -> (Trainer, LoraConfig) {
    let mut model = trained_llama();
    let config = lora(&[LoraTarget::QProj, LoraTarget::VProj, LoraTarget::DownProj]);
    model.add_lora(&config, 4).unwrap();
    train_three_steps(&mut model, (3, 11));
    (model, config)
}

/// Writes tests/fixtures/llama-lora: `adapter/` in PEFT's layout and `merged/` (run by
/// make_llama_fixture.py, which adds the logits peft and transformers compute; the base is
/// llama-smelt-export).
#[test]
#[ignore]
fn write_llama_lora_fixture() {
    let dir = fixtures().join("llama-lora");
    let (mut model, config) = adapted_llama();
    peft::write_adapter(
        &dir.join("adapter"),
        &config,
        &model.weights(),
        "llama-smelt-export",
    )
    .unwrap();
    model.merge_lora();
    std::fs::create_dir_all(dir.join("merged")).unwrap();
    model.save_hf(&dir.join("merged"), 1).unwrap();
}

/// peft loads smelt's Llama adapter onto the base and computes smelt's logits; transformers
/// computes the same for the merged model.
#[test]
fn peft_and_transformers_agree_with_adapted_and_merged_llamas() {
    let dir = fixtures().join("llama-lora");
    let fixture: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("logits.json")).unwrap()).unwrap();
    let floats = |key: &str| -> Vec<f32> {
        fixture[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let ids: Vec<u32> = floats("ids").into_iter().map(|x| x as u32).collect();
    let (mut model, config) = adapted_llama();
    let out = tempfile::tempdir().unwrap();
    peft::write_adapter(out.path(), &config, &model.weights(), "llama-smelt-export").unwrap();
    let written = std::fs::read(out.path().join("adapter_model.safetensors")).unwrap();
    let committed = std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        written == committed,
        "the adapter peft loaded is not the one smelt writes: after a change to the numerics, \
         rerun tests/fixtures/make_llama_fixture.py"
    );
    let worst = worst_difference(&model.logits(&ids, 2, 8), &floats("peft"));
    assert!(worst < 1e-4, "peft's logits differ by up to {worst}");
    model.merge_lora();
    let worst = worst_difference(&model.logits(&ids, 2, 8), &floats("merged"));
    assert!(worst < 1e-4, "transformers' merged logits differ by up to {worst}");
}
