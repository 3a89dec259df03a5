//! Token shards: `<name>-00000.bin` holds little-endian token ids (`u16` when every id fits,
//! else `u32`); `<name>-00000.idx` holds little-endian `u64` offsets, one more than the
//! sequences, so sequence `i` is tokens `idx[i]..idx[i+1]`; for fine-tuning data,
//! `<name>-00000.mask` holds one byte per token, 1 where the loss counts. A sequence never spans
//! two shards.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::records::IO_BUFFER;

/// How ids are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    U16,
    U32,
}

impl Dtype {
    /// The narrowest type that holds every id of a vocabulary.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            Dtype::U16
        } else {
            Dtype::U32
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }
}

/// One shard as meta.json lists it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Shard {
    pub tokens: String,
    pub index: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    pub sequences: u64,
    pub token_count: u64,
}

/// What one stream's shards hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stream {
    pub sequences: u64,
    pub tokens: u64,
    /// Tokens whose mask is 1 (fine-tuning streams only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable_tokens: Option<u64>,
    pub shards: Vec<Shard>,
}

struct Open {
    tokens: BufWriter<File>,
    index: BufWriter<File>,
    mask: Option<BufWriter<File>>,
    shard: Shard,
}

/// Writes the sequences of one stream (say `train`, or `chat-validation`) into shards of at
/// most `max_tokens` tokens (a longer sequence gets a shard of its own).
pub struct TokenWriter {
    dir: PathBuf,
    name: String,
    dtype: Dtype,
    masked: bool,
    max_tokens: u64,
    open: Option<Open>,
    stream: Stream,
    encoded: Vec<u8>,
}

impl TokenWriter {
    pub fn new(dir: &Path, name: &str, dtype: Dtype, masked: bool, max_tokens: u64) -> Self {
        TokenWriter {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            dtype,
            masked,
            max_tokens: max_tokens.max(1),
            open: None,
            stream: Stream {
                trainable_tokens: masked.then_some(0),
                ..Stream::default()
            },
            encoded: Vec::new(),
        }
    }

    /// Appends one sequence; `mask` is required exactly when the stream is masked.
    pub fn push(&mut self, ids: &[u32], mask: Option<&[u8]>) -> io::Result<()> {
        debug_assert_eq!(mask.is_some(), self.masked);
        let full = self.open.as_ref().is_some_and(|o| {
            o.shard.token_count > 0 && o.shard.token_count + ids.len() as u64 > self.max_tokens
        });
        if full || self.open.is_none() {
            self.next_shard()?;
        }
        self.encoded.clear();
        match self.dtype {
            Dtype::U16 => {
                for &id in ids {
                    self.encoded.extend_from_slice(&(id as u16).to_le_bytes());
                }
            }
            Dtype::U32 => {
                for &id in ids {
                    self.encoded.extend_from_slice(&id.to_le_bytes());
                }
            }
        }
        let open = self.open.as_mut().expect("a shard is open");
        open.tokens.write_all(&self.encoded)?;
        if let (Some(file), Some(mask)) = (&mut open.mask, mask) {
            file.write_all(mask)?;
            let trainable = mask.iter().filter(|&&m| m == 1).count() as u64;
            *self.stream.trainable_tokens.get_or_insert(0) += trainable;
        }
        open.shard.token_count += ids.len() as u64;
        open.shard.sequences += 1;
        open.index
            .write_all(&open.shard.token_count.to_le_bytes())?;
        self.stream.tokens += ids.len() as u64;
        self.stream.sequences += 1;
        Ok(())
    }

    fn next_shard(&mut self) -> io::Result<()> {
        self.close()?;
        let stem = format!("{}-{:05}", self.name, self.stream.shards.len());
        let create = |extension: &str| -> io::Result<(String, BufWriter<File>)> {
            let name = format!("{stem}.{extension}");
            let file = File::create(self.dir.join(&name))?;
            Ok((name, BufWriter::with_capacity(IO_BUFFER, file)))
        };
        let (tokens_name, tokens) = create("bin")?;
        let (index_name, mut index) = create("idx")?;
        index.write_all(&0u64.to_le_bytes())?;
        let mask = self.masked.then(|| create("mask")).transpose()?;
        self.open = Some(Open {
            tokens,
            index,
            shard: Shard {
                tokens: tokens_name,
                index: index_name,
                mask: mask.as_ref().map(|(name, _)| name.clone()),
                ..Shard::default()
            },
            mask: mask.map(|(_, file)| file),
        });
        Ok(())
    }

    fn close(&mut self) -> io::Result<()> {
        if let Some(mut open) = self.open.take() {
            open.tokens.flush()?;
            open.index.flush()?;
            if let Some(mask) = &mut open.mask {
                mask.flush()?;
            }
            self.stream.shards.push(open.shard);
        }
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<Stream> {
        self.close()?;
        Ok(self.stream)
    }
}

/// One sequence read back: its ids and, for a masked stream, its mask.
pub type Sequence = (Vec<u32>, Option<Vec<u8>>);

/// Reads a stream back: its sequences with their masks (tests, and the stages that train).
pub fn read_stream(dir: &Path, stream: &Stream, dtype: Dtype) -> io::Result<Vec<Sequence>> {
    let mut sequences = Vec::new();
    for shard in &stream.shards {
        let bytes = std::fs::read(dir.join(&shard.tokens))?;
        let ids: Vec<u32> = match dtype {
            Dtype::U16 => bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
                .collect(),
            Dtype::U32 => bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        };
        let offsets: Vec<usize> = std::fs::read(dir.join(&shard.index))?
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
            .collect();
        let mask = shard
            .mask
            .as_ref()
            .map(|m| std::fs::read(dir.join(m)))
            .transpose()?;
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {what}", shard.index),
            )
        };
        if offsets.first() != Some(&0) || offsets.last() != Some(&ids.len()) {
            return Err(bad("offsets do not cover the tokens"));
        }
        if mask.as_ref().is_some_and(|m| m.len() != ids.len()) {
            return Err(bad("the mask and the tokens differ in length"));
        }
        for span in offsets.windows(2) {
            if span[0] > span[1] {
                return Err(bad("offsets go backwards"));
            }
            sequences.push((
                ids[span[0]..span[1]].to_vec(),
                mask.as_ref().map(|m| m[span[0]..span[1]].to_vec()),
            ));
        }
    }
    Ok(sequences)
}
