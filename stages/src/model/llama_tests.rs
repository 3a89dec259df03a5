//! The engine on Llama-family models: gradients, checkpoints, adapters and exports, each as
//! GPT-2's are tested (`tests` in mod.rs), and against transformers and peft where they load it.

use std::path::Path;

use dfdx::prelude::*;

use super::llama::{LlamaConfig, Member};
use super::tests::{
    adamw, batch_ids, check_against_finite_differences, check_lora_fixture, fixture_logits, flat,
    lora, train_three_steps, worst_difference, write_lora_fixture_dir, Pick,
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

use crate::testing::{fixtures, smollm2};

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
    for name in [
        "llama-gqa-tied",
        "llama3-rope-bias",
        "qwen2",
        "mistral-window",
    ] {
        let dir = fixtures().join(name);
        let (mut model, eos) = Trainer::load(&dir, DeviceKind::Cpu, adamw()).unwrap();
        assert_eq!(eos, Some(1), "{name}");
        let (ids, expected) = fixture_logits(&dir);
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
    write_lora_fixture_dir(&dir, adapted_llama(), "llama-smelt-export", 1);
}

/// peft loads smelt's Llama adapter onto the base and computes smelt's logits; transformers
/// computes the same for the merged model.
#[test]
fn peft_and_transformers_agree_with_adapted_and_merged_llamas() {
    let dir = fixtures().join("llama-lora");
    let script = "make_llama_fixture.py";
    check_lora_fixture(&dir, adapted_llama(), "llama-smelt-export", script);
}

/// The notes' ChatML prompt (its 37 ids are checked below).
const FRANCE: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
                      Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of \
                      France?<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn smollm2_gguf_reads_as_the_notes_describe_it() {
    let file = gguf::Gguf::read(&smollm2()).unwrap();
    assert_eq!((file.version, file.tensors.len()), (3, 272));
    let mut types = std::collections::BTreeMap::new();
    for tensor in &file.tensors {
        *types.entry(gguf::type_name(tensor.kind)).or_insert(0) += 1;
    }
    let expected = [("F32", 61), ("Q4_1", 210), ("Q8_0", 1)];
    assert_eq!(types, expected.map(|(t, n)| (t.to_string(), n)).into());
    let config = file.llama_config().unwrap();
    let sizes = (config.hidden_size, config.intermediate_size, config.layers);
    assert_eq!(sizes, (576, 1536, 30));
    assert_eq!((config.heads, config.kv_heads, config.head_dim), (9, 3, 64));
    assert_eq!(
        (config.vocab_size, config.max_position_embeddings),
        (49152, 8192)
    );
    assert!(config.tie_word_embeddings);
    assert_eq!(
        (config.rope_theta, config.rms_norm_eps as f32),
        (100000.0, 1e-5)
    );
    assert_eq!(file.eos_id(), Some(2));
}

#[test]
fn smollm2_tokenizer_from_the_gguf_gives_the_published_ids() {
    let json = gguf::Gguf::read(&smollm2())
        .unwrap()
        .tokenizer_json()
        .unwrap();
    let tokenizer = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).unwrap();
    let ids = |text: &str| tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(ids("Hello, we can use"), [19556, 28, 392, 416, 722]);
    assert_eq!(ids("Hello world! 123"), [19556, 905, 17, 216, 33, 34, 35]);
    let prompt = ids(FRANCE);
    assert_eq!(prompt.len(), 37);
    assert_eq!(prompt[..4], [1, 9690, 198, 2683]);
    assert_eq!(prompt[31..], [2, 198, 1, 520, 9531, 198]);
}

/// The model's greedy answer, logits and the q/k un-permutation, against the values the notes
/// verified with transformers on the same file (dequantized, un-permuted, loaded as
/// LlamaForCausalLM).
#[test]
fn smollm2_answers_as_transformers_does() {
    let path = smollm2();
    let mut model = sample::LoadedModel::open(&path).unwrap();
    let prompt = model.encode(FRANCE).unwrap();
    let logits = model.model.logits(&prompt, 1, prompt.len());
    let last = &logits[(prompt.len() - 1) * 49152..];
    let expected = [10.166, 6.2121, 6.8371, 6.2551, 5.3848];
    let worst = worst_difference(&last[..5], &expected);
    assert!(worst < 2e-3, "logits {:?}: off by {worst}", &last[..5]);
    let answer = model.continue_ids(&prompt, &sample::Sampling::greedy(8), &[]);
    // The eighth id is `<|im_end|>` (2), the end-of-text id, where generation stops.
    assert_eq!(answer, [504, 3575, 282, 4649, 314, 7042, 30]);
    assert_eq!(
        model.decode(&answer).unwrap(),
        "The capital of France is Paris."
    );
    // Without the un-permutation the model runs and says nothing: `<|im_end|>` at once.
    let file = gguf::Gguf::read(&path).unwrap();
    let config = file.llama_config().unwrap();
    let mut tensors = file.hf_tensors(&config).unwrap();
    for (name, (shape, values)) in tensors.iter_mut() {
        let heads = match name {
            n if n.ends_with("q_proj.weight") => config.heads,
            n if n.ends_with("k_proj.weight") => config.kv_heads,
            _ => continue,
        };
        *values = gguf::permute_rows(values, shape, heads).unwrap();
    }
    let mut permuted = Trainer::from_tensors(config, &tensors, DeviceKind::Cpu, adamw()).unwrap();
    let logits = permuted.logits(&prompt, 1, prompt.len());
    let last = &logits[(prompt.len() - 1) * 49152..];
    let argmax = (0..last.len()).max_by(|&a, &b| last[a].total_cmp(&last[b]));
    assert_eq!(argmax, Some(2));
}

#[test]
fn unpermuting_inverts_llama_cpp_s_permutation() {
    let values: Vec<f32> = (0..24).map(|i| i as f32).collect();
    let shape = [12, 2];
    let stored = gguf::permute_rows(&values, &shape, 3).unwrap();
    let back = gguf::unpermute_rows(&stored, &shape, 3).unwrap();
    assert_eq!(back, values);
    // A head of 4 rows [r0 r1 r2 r3] is stored by llama.cpp as [r0 r2 r1 r3].
    let stored = gguf::permute_rows(&values[..8], &[4, 2], 1).unwrap();
    assert_eq!(stored, [0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]);
}

/// transformers 4 writes the rope settings at the top level (`rope_theta`, `rope_scaling` with
/// `type` or `rope_type`); 5 nests them in `rope_parameters`. Both describe the same model.
#[test]
fn a_transformers_4_config_loads_as_its_transformers_5_form() {
    let dir = fixtures().join("llama3-rope-bias");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let mut rope = config["rope_parameters"].take();
    config.as_object_mut().unwrap().remove("rope_parameters");
    config["rope_theta"] = rope["rope_theta"].take();
    let scaling = rope.as_object_mut().unwrap();
    scaling.remove("rope_theta");
    scaling.remove("rope_type");
    scaling.insert("type".into(), "llama3".into());
    config["rope_scaling"] = rope;
    config["torch_dtype"] = config["dtype"].take();
    let v4 = tempfile::tempdir().unwrap();
    std::fs::write(v4.path().join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        dir.join("model.safetensors"),
        v4.path().join("model.safetensors"),
    )
    .unwrap();
    let (mut old, _) = Trainer::load(v4.path(), DeviceKind::Cpu, adamw()).unwrap();
    let (mut new, _) = Trainer::load(&dir, DeviceKind::Cpu, adamw()).unwrap();
    assert_eq!(old.config(), new.config());
    let ids: Vec<u32> = (0..16).map(|i| i % 16).collect();
    assert_eq!(old.logits(&ids, 2, 8), new.logits(&ids, 2, 8));
}

#[test]
fn unknown_model_types_and_rope_types_are_named_with_what_loads() {
    let dir = tempfile::tempdir().unwrap();
    let write = |config: serde_json::Value| {
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        Trainer::load(dir.path(), DeviceKind::Cpu, adamw())
            .err()
            .unwrap()
    };
    let base: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("llama-gqa-tied/config.json")).unwrap(),
    )
    .unwrap();
    let mut yarn = base.clone();
    yarn["rope_parameters"]["rope_type"] = "yarn".into();
    assert!(write(yarn).ends_with(
        "config.json: rope scaling `yarn` is not supported (default, linear and llama3 are)"
    ),);
    let mut falcon = base;
    falcon["model_type"] = "falcon".into();
    let err = write(falcon);
    assert!(err.contains("`model_type` is \"falcon\""), "{err}");
}

/// SmolLM2 with a rank-2 adapter on q_proj, trained three steps: its adapter and the model.
fn adapted_smollm2() -> (Trainer, LoraConfig) {
    let (mut model, _) = Trainer::load(&smollm2(), DeviceKind::Cpu, adamw()).unwrap();
    let config = LoraConfig {
        r: 2,
        ..lora(&[LoraTarget::QProj])
    };
    model.add_lora(&config, 6).unwrap();
    train_three_steps(&mut model, (3, 11));
    (model, config)
}

/// Writes target/smollm2-lora/adapter (not committed: 270 KB) for make_smollm2_fixture.py,
/// which loads it with peft on transformers' own reading of the GGUF file and commits the
/// logits and the adapter's hash.
#[test]
#[ignore]
fn write_smollm2_lora_adapter() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/smollm2-lora");
    let (mut model, config) = adapted_smollm2();
    peft::write_adapter(&dir.join("adapter"), &config, &model.weights(), "smollm2").unwrap();
}

/// transformers reads the GGUF file itself (`from_pretrained(…, gguf_file=…)`): smelt computes
/// its logits, and a LoRA adapter smelt trains on it loads with peft on transformers' model and
/// computes smelt's logits (tests/fixtures/make_smollm2_fixture.py).
#[test]
fn smollm2_gguf_gives_transformers_logits_and_peft_loads_its_adapter() {
    let fixture: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("smollm2/logits.json")).unwrap())
            .unwrap();
    let floats =
        |v: &serde_json::Value| -> Vec<f32> { flat(v).iter().map(|&x| x as f32).collect() };
    let ids: Vec<u32> = floats(&fixture["ids"]).iter().map(|&x| x as u32).collect();
    let rows = ids.len();
    // The logits of every position's first 8 vocabulary entries (a full row is 49152 wide).
    let head = |logits: &[f32]| -> Vec<f32> {
        logits
            .chunks(49152)
            .flat_map(|row| row[..8].to_vec())
            .collect()
    };
    let (mut base, _) = Trainer::load(&smollm2(), DeviceKind::Cpu, adamw()).unwrap();
    let worst = worst_difference(
        &head(&base.logits(&ids, 1, rows)),
        &floats(&fixture["base"]),
    );
    assert!(worst < 2e-3, "transformers' logits differ by up to {worst}");
    let (mut model, config) = adapted_smollm2();
    let out = tempfile::tempdir().unwrap();
    peft::write_adapter(out.path(), &config, &model.weights(), "smollm2").unwrap();
    let written = std::fs::read(out.path().join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        blake3::hash(&written).to_hex().as_str(),
        fixture["adapter_blake3"].as_str().unwrap(),
        "the adapter peft loaded is not the one smelt writes: after a change to the numerics, \
         rerun tests/fixtures/make_smollm2_fixture.py"
    );
    let worst = worst_difference(
        &head(&model.logits(&ids, 1, rows)),
        &floats(&fixture["peft"]),
    );
    assert!(worst < 2e-3, "peft's logits differ by up to {worst}");
}

/// Generation runs the model on the prompt, then on one token at a time with the keys and
/// values cached: each step's logits are those of a full pass over everything so far, with
/// grouped-query attention and with Mistral's sliding window (3 positions) alike.
#[test]
fn cached_decoding_gives_the_logits_of_full_passes() {
    let (mistral, _) =
        Trainer::load(&fixtures().join("mistral-window"), DeviceKind::Cpu, adamw()).unwrap();
    for (name, mut model) in [("llama", trained_llama()), ("mistral", mistral)] {
        let vocab = model.config().vocab_size();
        let ids: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6];
        let mut state = DecodeState::default();
        let prompt = model.decode(&ids[..3], &mut state);
        let full = model.logits(&ids[..3], 1, 3);
        assert!(worst_difference(&prompt, &full) < 1e-5, "{name}: prompt");
        for n in 4..=ids.len() {
            let step = model.decode(&ids[n - 1..n], &mut state);
            let full = model.logits(&ids[..n], 1, n);
            let worst = worst_difference(&step, &full[(n - 1) * vocab..]);
            assert!(worst < 1e-5, "{name}: position {n} differs by {worst}");
        }
        assert_eq!(state.positions(), ids.len());
    }
}

/// A checkpoint split in shards, as transformers writes large models: the index maps each
/// tensor to its file. Split here by hand: the same model loads; a shard the index names but
/// the directory lacks is named.
#[test]
fn sharded_checkpoints_load_and_a_missing_shard_is_named() {
    let dir = fixtures().join("llama-gqa-tied");
    let tensors = io::read_safetensors(&dir.join("model.safetensors")).unwrap();
    let sharded = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("config.json"), sharded.path().join("config.json")).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (shard, names) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let named: io::Named = names
            .iter()
            .map(|n| (n.to_string(), tensors[*n].0.clone(), tensors[*n].1.clone()))
            .collect();
        io::write_safetensors(&sharded.path().join(shard), &named, None).unwrap();
        for n in names.iter() {
            map.insert(n.to_string(), shard.into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    let index_path = sharded.path().join("model.safetensors.index.json");
    std::fs::write(&index_path, index.to_string()).unwrap();
    let (mut whole, _) = Trainer::load(&dir, DeviceKind::Cpu, adamw()).unwrap();
    let (mut split, _) = Trainer::load(sharded.path(), DeviceKind::Cpu, adamw()).unwrap();
    assert_eq!(split.weights(), whole.weights());
    std::fs::remove_file(sharded.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = Trainer::load(sharded.path(), DeviceKind::Cpu, adamw())
        .err()
        .unwrap();
    assert!(
        err.contains("model-00002-of-00002.safetensors: No such file"),
        "{err}"
    );
}

/// A tiny Llama over byte-level tokens (256 bytes and `<|endoftext|>`), its weights 20 times
/// their initial scale so that its logits lie far apart and greedy decoding does not hinge on
/// rounding (llama.cpp computes otherwise than smelt), and its tokenizer.json.
fn llama_for_llama_cpp() -> (Trainer, serde_json::Value) {
    let config = LlamaConfig {
        vocab_size: 257,
        hidden_size: 32,
        intermediate_size: 48,
        head_dim: 8,
        attention_bias: false,
        output_bias: false,
        max_position_embeddings: 64,
        ..tiny_llama(false)
    };
    let mut model = Trainer::new(config, DeviceKind::Cpu, 5, adamw()).unwrap();
    let scaled: io::Tensors = model
        .weights()
        .into_iter()
        .map(|(name, shape, values)| {
            let factor = if name.ends_with("norm.weight") {
                1.0
            } else {
                20.0
            };
            (name, (shape, values.iter().map(|v| v * factor).collect()))
        })
        .collect();
    model.set_weights(&scaled).unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> = crate::tokenize::byte_chars()
        .iter()
        .enumerate()
        .map(|(id, c)| (c.to_string(), id.into()))
        .collect();
    let byte_level = serde_json::json!({ "type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true });
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "normalizer": null,
        "added_tokens": [{ "id": 256, "content": "<|endoftext|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true }],
        "pre_tokenizer": byte_level, "post_processor": byte_level, "decoder": byte_level,
        "model": { "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": [] },
    });
    (model, tokenizer)
}

/// Prompts (byte ids) whose greedy continuations llama.cpp computed on the export.
const LLAMA_CPP_PROMPTS: [&str; 3] = ["Hello", "The cat sat on", "1 2 3"];

/// Writes target/llama-cpp/model.gguf (f16), which make_llama_cpp_fixture.py runs in
/// llama-cpp-python.
#[test]
#[ignore]
fn write_llama_cpp_export() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/llama-cpp");
    std::fs::create_dir_all(&dir).unwrap();
    let (mut model, tokenizer) = llama_for_llama_cpp();
    export_gguf(
        &mut model,
        &dir.join("model.gguf"),
        &tokenizer,
        None,
        256,
        gguf::ExportType::F16,
    )
    .unwrap();
}

/// tests/fixtures/llama-cpp/greedy.json: llama.cpp (llama-cpp-python) loaded smelt's f16
/// export of `llama_for_llama_cpp` and decoded greedily; smelt, reading the same file, must
/// give the same ids.
#[test]
fn llama_cpp_continues_a_smelt_export_as_smelt_does() {
    let text = std::fs::read_to_string(fixtures().join("llama-cpp/greedy.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    let (mut model, tokenizer) = llama_for_llama_cpp();
    export_gguf(
        &mut model,
        &path,
        &tokenizer,
        None,
        256,
        gguf::ExportType::F16,
    )
    .unwrap();
    let hash = blake3::hash(&std::fs::read(&path).unwrap())
        .to_hex()
        .to_string();
    assert_eq!(
        fixture["gguf_blake3"], hash,
        "the export changed: rerun tests/fixtures/make_llama_cpp_fixture.py"
    );
    let mut loaded = sample::LoadedModel::open(&path).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), LLAMA_CPP_PROMPTS.len());
    for (prompt, case) in LLAMA_CPP_PROMPTS.iter().zip(cases) {
        let ids: Vec<u32> = serde_json::from_value(case["prompt"].clone()).unwrap();
        assert_eq!(loaded.encode(prompt).unwrap(), ids, "{prompt}");
        let expected: Vec<u32> = serde_json::from_value(case["greedy"].clone()).unwrap();
        let greedy = sample::Sampling::greedy(expected.len());
        let ours = loaded.continue_ids(&ids, &greedy, &[]);
        // smelt stops at the end-of-text id, which llama.cpp's `generate` would pass.
        let end = expected
            .iter()
            .position(|&id| id == 256)
            .unwrap_or(expected.len());
        assert_eq!(ours, expected[..end], "{prompt}");
    }
}

/// `smelt export --gguf` keeps the model's chat template, where llama.cpp and transformers look.
#[test]
fn a_gguf_export_carries_the_chat_template() {
    let (mut model, tokenizer) = llama_for_llama_cpp();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    let template = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
    let kind = gguf::ExportType::Q8_0;
    export_gguf(&mut model, &path, &tokenizer, Some(template), 256, kind).unwrap();
    assert_eq!(
        gguf::Gguf::read(&path).unwrap().chat_template(),
        Some(template)
    );
}
