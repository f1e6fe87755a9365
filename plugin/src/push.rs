//! P/D push: write a request's blocks straight into a remote worker's
//! registered KV blocks, then notify it with a caller-supplied transfer id.
//!
//! ```text
//!  prefill: KvCache::push(dst, src_blocks, dst_blocks, transfer_id)
//!     plan_copy (pure; refuses blocks outside either cache, repeated
//!     destinations and shape mismatches before any byte moves)
//!     -> one engine batch of WRITEs (segments merged across heads,
//!        layers and adjacent blocks) + notification PushNotice{transfer_id}
//!     -> Push::poll / wait: PushStatus with per-block failures
//!  decode:  PushInbox::poll_received() -> ReceivedPush{transfer_id, ..}
//!     (delivered only after every byte of the push has landed)
//! ```

use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

use kvmesh_gpu::{Batch, BatchOptions, Engine, EngineId, ErrorKind, Notification, Op};
use parking_lot::Mutex;

use crate::cache::{KvCache, RemoteKvCache};
use crate::error::{Error, Result};
use crate::layout::plan_copy;

/// Longest transfer id accepted (bytes).
pub const MAX_TRANSFER_ID: usize = 256;
/// Notifications of other kinds kept for [`PushInbox::take_other`].
const MAX_OTHER_NOTIFICATIONS: usize = 1024;

const NOTICE_MAGIC: [u8; 7] = *b"KVPUSH\0";
const NOTICE_VERSION: u8 = 1;

/// The notification a push delivers after its bytes landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushNotice {
    pub transfer_id: Vec<u8>,
    /// Number of blocks written.
    pub blocks: u32,
}

impl PushNotice {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.transfer_id.len());
        v.extend_from_slice(&NOTICE_MAGIC);
        v.push(NOTICE_VERSION);
        v.extend_from_slice(&(self.transfer_id.len() as u16).to_le_bytes());
        v.extend_from_slice(&self.transfer_id);
        v.extend_from_slice(&self.blocks.to_le_bytes());
        v
    }

    /// `None` unless `b` is exactly one well-formed notice.
    pub fn decode(b: &[u8]) -> Option<PushNotice> {
        let rest = b.strip_prefix(&NOTICE_MAGIC)?;
        let (&ver, rest) = rest.split_first()?;
        if ver != NOTICE_VERSION || rest.len() < 2 {
            return None;
        }
        let n = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let rest = &rest[2..];
        if n == 0 || n > MAX_TRANSFER_ID || rest.len() != n + 4 {
            return None;
        }
        Some(PushNotice {
            transfer_id: rest[..n].to_vec(),
            blocks: u32::from_le_bytes(rest[n..].try_into().ok()?),
        })
    }
}

/// One block of a push that did not land.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockFailure {
    /// Entry in the push's block lists.
    pub index: u32,
    /// Source block id.
    pub src_block: u32,
    /// Destination block id.
    pub dst_block: u32,
    pub error: ErrorKind,
}

/// Outcome of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushStatus {
    /// `Ok` iff every byte landed and the receiver was notified.
    pub result: Result<(), ErrorKind>,
    /// Bytes that landed.
    pub bytes: u64,
    /// Blocks with bytes that did not land (empty when only the
    /// notification failed).
    pub failed: Vec<BlockFailure>,
    /// A sentence for logs and the C ABI's last error, when failed.
    pub message: Option<String>,
}

/// A push in flight. Dropping it does not cancel it.
#[derive(Debug, Clone)]
pub struct Push {
    batch: Batch,
    /// Entries each engine op carries.
    op_blocks: Vec<Range<u32>>,
    src_blocks: Vec<u32>,
    dst_blocks: Vec<u32>,
    transfer_id: Vec<u8>,
    peer: EngineId,
}

impl KvCache {
    /// Pushes `src_blocks` of this cache into `dst_blocks` of `dst` (entry
    /// `i` to entry `i`, every layer), then notifies the owner of `dst`
    /// with `transfer_id` (1..=256 bytes). An empty block list sends the
    /// notification alone.
    ///
    /// Blocks outside either cache, repeated destination blocks and
    /// mismatched block shapes are refused here, before any byte moves.
    /// Never blocks on the network; `timeout` bounds the whole push (the
    /// engine default when `None`).
    pub fn push(
        &self,
        dst: &RemoteKvCache,
        src_blocks: &[u32],
        dst_blocks: &[u32],
        transfer_id: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Push> {
        if transfer_id.is_empty() || transfer_id.len() > MAX_TRANSFER_ID {
            return Err(Error::Invalid(format!(
                "transfer id of {} bytes (must be 1..={MAX_TRANSFER_ID})",
                transfer_id.len()
            )));
        }
        let notice = PushNotice {
            transfer_id: transfer_id.to_vec(),
            blocks: src_blocks.len() as u32,
        }
        .encode();
        let (ops, op_blocks) = if src_blocks.is_empty() && dst_blocks.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            let layers = 0..self.layout().num_layers();
            let plan = plan_copy(self.layout(), src_blocks, dst.layout(), dst_blocks, layers)?;
            let ops: Vec<Op> = plan
                .iter()
                .map(|s| {
                    Op::write(
                        self.regions()[s.src.region as usize].id(),
                        s.src.offset,
                        dst.regions()[s.dst.region as usize],
                        s.dst.offset,
                        s.len,
                    )
                })
                .collect();
            (ops, plan.into_iter().map(|s| s.blocks).collect())
        };
        let batch = self.track(|| {
            Ok(if ops.is_empty() {
                self.engine().notify(dst.peer(), notice, timeout)?
            } else {
                self.engine().submit(
                    &ops,
                    BatchOptions {
                        timeout,
                        notify: Some(notice),
                    },
                )?
            })
        })?;
        Ok(Push {
            batch,
            op_blocks,
            src_blocks: src_blocks.to_vec(),
            dst_blocks: dst_blocks.to_vec(),
            transfer_id: transfer_id.to_vec(),
            peer: dst.engine_id(),
        })
    }
}

impl Push {
    pub fn transfer_id(&self) -> &[u8] {
        &self.transfer_id
    }

    /// Number of blocks pushed.
    pub fn blocks(&self) -> usize {
        self.src_blocks.len()
    }

    /// Non-blocking: the status once the push has completed. When it
    /// completed `Ok`, the receiver has already queued the notice.
    pub fn poll(&self) -> Option<PushStatus> {
        self.batch.poll().map(|s| self.status(s))
    }

    /// Blocks up to `timeout`; `None` if still running. Every push
    /// completes by its own deadline.
    pub fn wait(&self, timeout: Duration) -> Option<PushStatus> {
        self.batch.wait_blocking(timeout).map(|s| self.status(s))
    }

    /// Async wait. Cancel-safe: dropping the future leaves the push running.
    pub async fn wait_async(&self) -> PushStatus {
        let s = self.batch.wait().await;
        self.status(s)
    }

    /// Cancels: writes not yet started end as `Cancelled` and the receiver
    /// is not notified.
    pub fn cancel(&self) {
        self.batch.cancel();
    }

    fn status(&self, s: kvmesh_gpu::BatchStatus) -> PushStatus {
        let mut first: Vec<Option<ErrorKind>> = vec![None; self.src_blocks.len()];
        for (op, blocks) in s.ops.iter().zip(&self.op_blocks) {
            if let Some(e) = op.error {
                for i in blocks.clone() {
                    first[i as usize].get_or_insert(e);
                }
            }
        }
        let failed: Vec<BlockFailure> = first
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                e.map(|error| BlockFailure {
                    index: i as u32,
                    src_block: self.src_blocks[i],
                    dst_block: self.dst_blocks[i],
                    error,
                })
            })
            .collect();
        let message = s.result.err().map(|k| {
            let what = if failed.is_empty() && !self.src_blocks.is_empty() {
                "all bytes landed but the receiver was not notified".to_string()
            } else {
                format!(
                    "{} of {} blocks did not land",
                    failed.len(),
                    self.src_blocks.len()
                )
            };
            format!(
                "push of transfer {} to engine {}: {k} ({what})",
                show_id(&self.transfer_id),
                hex8(&self.peer)
            )
        });
        PushStatus {
            result: s.result,
            bytes: s.bytes,
            failed,
            message,
        }
    }
}

/// Printable transfer id: the text if it is printable UTF-8, else hex.
pub(crate) fn show_id(id: &[u8]) -> String {
    match std::str::from_utf8(id) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => format!("{s:?}"),
        _ => id.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

fn hex8(id: &EngineId) -> String {
    id[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A push received by this engine (all its bytes landed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedPush {
    /// Engine id of the sender.
    pub from: EngineId,
    pub transfer_id: Vec<u8>,
    pub blocks: u32,
}

/// Receiver side: separates push notifications from other notifications
/// of the engine. Use one per engine.
#[derive(Debug)]
pub struct PushInbox {
    engine: Engine,
    others: Mutex<VecDeque<Notification>>,
}

impl PushInbox {
    pub fn new(engine: &Engine) -> Self {
        PushInbox {
            engine: engine.clone(),
            others: Mutex::new(VecDeque::new()),
        }
    }

    /// Up to `max` pushes received since the last call (non-blocking).
    pub fn poll_received(&self, max: usize) -> Vec<ReceivedPush> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(n) = self.engine.try_recv_notification() else {
                break;
            };
            match PushNotice::decode(&n.data) {
                Some(p) => out.push(ReceivedPush {
                    from: n.from,
                    transfer_id: p.transfer_id,
                    blocks: p.blocks,
                }),
                None => {
                    let mut o = self.others.lock();
                    if o.len() == MAX_OTHER_NOTIFICATIONS {
                        o.pop_front();
                        tracing::warn!("dropping an unclaimed engine notification");
                    }
                    o.push_back(n);
                }
            }
        }
        out
    }

    /// Waits up to `timeout` for the next received push.
    pub fn wait_received(&self, timeout: Duration) -> Option<ReceivedPush> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(p) = self.poll_received(1).pop() {
                return Some(p);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// A notification that was not a push (for other users of the engine).
    pub fn take_other(&self) -> Option<Notification> {
        self.others.lock().pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip_and_reject_garbage() {
        let n = PushNotice {
            transfer_id: b"req-42".to_vec(),
            blocks: 7,
        };
        let b = n.encode();
        assert_eq!(PushNotice::decode(&b), Some(n));
        assert_eq!(PushNotice::decode(&b[..b.len() - 1]), None);
        let mut long = b.clone();
        long.push(0);
        assert_eq!(PushNotice::decode(&long), None);
        assert_eq!(PushNotice::decode(b"hello"), None);
        let mut v = b.clone();
        v[7] = 2; // version
        assert_eq!(PushNotice::decode(&v), None);
    }

    #[test]
    fn transfer_ids_print_as_text_or_hex() {
        assert_eq!(show_id(b"req-1"), "\"req-1\"");
        assert_eq!(show_id(&[0, 255]), "00ff");
    }
}
