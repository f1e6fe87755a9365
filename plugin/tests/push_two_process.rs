//! P/D push into a second process: the decode worker is this test binary
//! re-executed as the ignored test `decode_worker_child`, driven over its
//! stdin/stdout.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use kvmesh_gpu::{pattern, Engine, EngineConfig, ErrorKind, MemoryKind};
use kvmesh_plugin::{
    BlockShape, DType, HeadOrder, KvCache, KvCacheDesc, KvLayout, LayoutError, PushInbox,
    RemoteKvCache,
};
use rand::seq::SliceRandom;
use rand::SeedableRng;

const CHILD_ENV: &str = "KVMESH_PUSH_TEST_CHILD";

fn layout(family: &str, shape: BlockShape, blocks: u32) -> KvLayout {
    match family {
        "flash" => KvLayout::vllm_flash_attn(shape, blocks, HeadOrder::Nhd),
        "flash-hnd" => KvLayout::vllm_flash_attn(shape, blocks, HeadOrder::Hnd),
        "blocks-first" => KvLayout::vllm_blocks_first(shape, blocks, HeadOrder::Nhd),
        "trtllm" => KvLayout::trtllm_pool(shape, blocks),
        other => panic!("unknown layout family {other}"),
    }
    .unwrap()
}

fn shape(layers: u32) -> BlockShape {
    BlockShape::kv(layers, 16, 2, 64, DType::Bf16)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The decode worker. Configured by `KVMESH_PUSH_TEST_CHILD` =
/// "family layers blocks register|alloc seed".
#[test]
#[ignore = "child process of the two-process push tests"]
fn decode_worker_child() {
    let Ok(args) = std::env::var(CHILD_ENV) else {
        panic!("run by the two-process tests only");
    };
    let a: Vec<&str> = args.split_whitespace().collect();
    let (family, layers, blocks, mode, seed) = (
        a[0],
        a[1].parse().unwrap(),
        a[2].parse().unwrap(),
        a[3],
        a[4].parse::<u64>().unwrap(),
    );
    let l = layout(family, shape(layers), blocks);
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let mut mem: Vec<Vec<u8>> = (0..l.region_count())
        .map(|r| {
            let mut v = vec![0u8; l.required_region_len(r) as usize];
            pattern::fill(&mut v, seed + r as u64, 0);
            v
        })
        .collect();
    let cache = if mode == "register" {
        let bases: Vec<(*mut u8, u64)> = mem
            .iter_mut()
            .map(|m| (m.as_mut_ptr(), m.len() as u64))
            .collect();
        // SAFETY: `mem` outlives the cache (deregistered before it drops).
        unsafe { KvCache::register(&engine, l.clone(), &bases, MemoryKind::Host) }.unwrap()
    } else {
        let c = KvCache::alloc(&engine, l.clone(), MemoryKind::Host).unwrap();
        for (r, m) in mem.iter().enumerate() {
            c.regions()[r].write_at(0, m).unwrap();
        }
        c
    };
    let inbox = PushInbox::new(&engine);
    let mut out = std::io::stdout();
    writeln!(out, "KVMESH_DESC {}", hex(&cache.desc().to_bytes())).unwrap();
    out.flush().unwrap();
    for line in std::io::stdin().lines() {
        let line = line.unwrap();
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.first().copied() {
            Some("wait") => {
                let ms = w[1].parse().unwrap();
                match inbox.wait_received(Duration::from_millis(ms)) {
                    Some(p) => writeln!(
                        out,
                        "KVMESH_RECEIVED {} {} {}",
                        hex(&p.transfer_id),
                        p.blocks,
                        hex(&p.from)
                    ),
                    None => writeln!(out, "KVMESH_NONE"),
                }
                .unwrap();
            }
            Some("hash") => {
                for (r, reg) in cache.regions().iter().enumerate() {
                    let mut buf = vec![0u8; reg.len() as usize];
                    reg.read_at(0, &mut buf).unwrap();
                    writeln!(out, "KVMESH_HASH {r} {}", blake3::hash(&buf).to_hex()).unwrap();
                }
                writeln!(out, "KVMESH_END").unwrap();
            }
            _ => break,
        }
        out.flush().unwrap();
    }
    cache.deregister(Duration::from_secs(5)).unwrap();
    drop(mem);
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    desc: KvCacheDesc,
}

impl Worker {
    fn start(family: &str, layers: u32, blocks: u32, mode: &str, seed: u64) -> Worker {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "decode_worker_child", "--nocapture"])
            .env(
                CHILD_ENV,
                format!("{family} {layers} {blocks} {mode} {seed}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let line = next_line(&mut stdout);
        let h = line.strip_prefix("KVMESH_DESC ").expect("descriptor line");
        let desc = KvCacheDesc::from_bytes(&unhex(h)).unwrap();
        Worker {
            child,
            stdin,
            stdout,
            desc,
        }
    }

    fn line(&mut self) -> String {
        next_line(&mut self.stdout)
    }

    fn cmd(&mut self, c: &str) {
        writeln!(self.stdin, "{c}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn wait_received(&mut self, ms: u64) -> Option<(Vec<u8>, u32)> {
        self.cmd(&format!("wait {ms}"));
        let l = self.line();
        if l == "KVMESH_NONE" {
            return None;
        }
        let w: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(w[0], "KVMESH_RECEIVED");
        Some((unhex(w[1]), w[2].parse().unwrap()))
    }

    fn hashes(&mut self) -> Vec<String> {
        self.cmd("hash");
        let mut v = Vec::new();
        loop {
            let l = self.line();
            if l == "KVMESH_END" {
                return v;
            }
            v.push(l.split_whitespace().nth(2).unwrap().to_string());
        }
    }

    fn quit(mut self) {
        self.cmd("quit");
        let st = self.child.wait().unwrap();
        assert!(st.success(), "worker failed: {st}");
    }
}

/// The next protocol line (libtest's own output is skipped).
fn next_line(r: &mut BufReader<ChildStdout>) -> String {
    loop {
        let mut l = String::new();
        assert!(r.read_line(&mut l).unwrap() > 0, "worker exited");
        if l.starts_with("KVMESH_") {
            return l.trim().to_string();
        }
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// The worker's initial memory.
fn initial(l: &KvLayout, seed: u64) -> Vec<Vec<u8>> {
    (0..l.region_count())
        .map(|r| {
            let mut v = vec![0u8; l.required_region_len(r) as usize];
            pattern::fill(&mut v, seed + r as u64, 0);
            v
        })
        .collect()
}

/// `dst` after blocks `sb` of `src` land in blocks `db`, vector by vector.
fn expected(
    sl: &KvLayout,
    src: &KvCache,
    dl: &KvLayout,
    mut dst: Vec<Vec<u8>>,
    sb: &[u32],
    db: &[u32],
) -> Vec<String> {
    let s = sl.shape();
    let vb = s.vector_bytes() as usize;
    let mut buf = vec![0u8; vb];
    for (&a, &b) in sb.iter().zip(db) {
        for l in 0..s.num_layers {
            for kv in 0..2 {
                for t in 0..s.block_size {
                    for h in 0..s.num_kv_heads {
                        let p = sl.vector_place(l, a, kv, t, h);
                        src.regions()[p.region as usize]
                            .read_at(p.offset, &mut buf)
                            .unwrap();
                        let q = dl.vector_place(l, b, kv, t, h);
                        dst[q.region as usize][q.offset as usize..][..vb].copy_from_slice(&buf);
                    }
                }
            }
        }
    }
    dst.iter()
        .map(|m| blake3::hash(m).to_hex().to_string())
        .collect()
}

fn source(engine: &Engine, family: &str, layers: u32, blocks: u32) -> KvCache {
    let l = layout(family, shape(layers), blocks);
    let c = KvCache::alloc(engine, l, MemoryKind::Host).unwrap();
    for (r, reg) in c.regions().iter().enumerate() {
        let mut v = vec![0u8; reg.len() as usize];
        pattern::fill(&mut v, 1000 + r as u64, 0);
        reg.write_at(0, &v).unwrap();
    }
    c
}

#[test]
fn push_lands_exactly_in_the_named_blocks_of_another_process() {
    // (src family, dst family, dst memory): caller memory goes over tcp,
    // engine memory over shm; layouts differ on the two sides.
    for (sf, df, mode) in [
        ("blocks-first", "flash", "register"),
        ("trtllm", "flash-hnd", "alloc"),
    ] {
        let mut w = Worker::start(df, 4, 96, mode, 7);
        let engine = Engine::new(EngineConfig::default()).unwrap();
        let src = source(&engine, sf, 4, 64);
        let remote = RemoteKvCache::import(&engine, &w.desc).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut s: Vec<u32> = (0..64).collect();
        let mut d: Vec<u32> = (0..96).collect();
        s.shuffle(&mut rng);
        d.shuffle(&mut rng);
        // Include a run of adjacent blocks (merged segments).
        let (sb, db): (Vec<u32>, Vec<u32>) = ([5, 6, 7]
            .into_iter()
            .chain(s[..9].iter().copied().filter(|x| !(5..8).contains(x))))
        .zip(
            [40, 41, 42]
                .into_iter()
                .chain(d.iter().copied().filter(|x| !(40..43).contains(x))),
        )
        .unzip();
        let before = w.hashes();
        let push = src
            .push(&remote, &sb, &db, b"req-abc", Some(Duration::from_secs(20)))
            .unwrap();
        let st = push.wait(Duration::from_secs(30)).expect("push completes");
        assert_eq!(st.result, Ok(()), "{sf}->{df} ({mode}): {:?}", st.message);
        assert!(st.failed.is_empty());
        assert_eq!(
            st.bytes,
            sb.len() as u64 * src.layout().shape().block_bytes()
        );
        let (tid, n) = w.wait_received(10_000).expect("notification");
        assert_eq!((tid.as_slice(), n), (&b"req-abc"[..], sb.len() as u32));
        let want = expected(
            src.layout(),
            &src,
            &w.desc.layout,
            initial(&w.desc.layout, 7),
            &sb,
            &db,
        );
        let got = w.hashes();
        assert_eq!(got, want, "{sf}->{df} ({mode}): worker memory differs");
        assert_ne!(got, before);
        // An empty push is the notification alone.
        let p = src.push(&remote, &[], &[], b"done", None).unwrap();
        assert_eq!(p.wait(Duration::from_secs(10)).unwrap().result, Ok(()));
        assert_eq!(w.wait_received(10_000), Some((b"done".to_vec(), 0)));
        assert_eq!(w.hashes(), want);
        w.quit();
        src.deregister(Duration::from_secs(5)).unwrap();
    }
}

#[test]
fn push_outside_the_registered_cache_is_refused_before_any_byte_moves() {
    let mut w = Worker::start("flash", 2, 32, "register", 9);
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let src = source(&engine, "flash", 2, 32);
    let remote = RemoteKvCache::import(&engine, &w.desc).unwrap();
    let before = w.hashes();
    let err = src
        .push(&remote, &[1, 2], &[3, 32], b"t", None)
        .unwrap_err();
    assert!(
        matches!(
            err,
            kvmesh_plugin::Error::Layout(LayoutError::BlockOutOfRange {
                block: 32,
                index: 1,
                ..
            })
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "destination block 32 (entry 1) is outside the cache's 32 blocks"
    );
    let err = src.push(&remote, &[32], &[0], b"t", None).unwrap_err();
    assert!(err.to_string().starts_with("source block 32"), "{err}");
    let err = src.push(&remote, &[1, 2], &[4, 4], b"t", None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "destination block 4 appears twice (entries 0 and 1)"
    );
    // A descriptor that claims more blocks than its regions hold is refused.
    let mut forged = w.desc.clone();
    let mut spec = *forged.layout.spec();
    spec.num_blocks = 64;
    spec.strides.kv *= 2;
    forged.layout = KvLayout::new(spec).unwrap();
    let err = RemoteKvCache::import(&engine, &forged).unwrap_err();
    assert!(err.to_string().contains("the layout needs"), "{err}");
    let err = KvCacheDesc::from_bytes(&forged.to_bytes()).unwrap_err();
    assert!(err.to_string().contains("region 0 holds"), "{err}");
    // Nothing moved, nothing was announced.
    assert_eq!(w.wait_received(300), None);
    assert_eq!(w.hashes(), before);
    w.quit();
}

#[test]
fn receiver_killed_mid_push_gives_the_sender_a_clear_error() {
    // 8 layers x 1024 blocks x 8 KiB = 64 MiB: far more than the socket
    // buffers hold while the receiver is stopped.
    let mut w = Worker::start("flash", 8, 1024, "register", 5);
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let src = source(&engine, "flash", 8, 1024);
    let remote = RemoteKvCache::import(&engine, &w.desc).unwrap();
    let pid = w.child.id() as libc::pid_t;
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let all: Vec<u32> = (0..1024).collect();
    let push = src
        .push(
            &remote,
            &all,
            &all,
            b"req-killed",
            Some(Duration::from_secs(60)),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        push.poll().is_none(),
        "push finished into a stopped receiver"
    );
    w.child.kill().unwrap();
    w.child.wait().unwrap();
    let st = push
        .wait(Duration::from_secs(30))
        .expect("a push to a dead receiver completes long before its deadline");
    assert_eq!(
        st.result,
        Err(ErrorKind::ConnectionLost),
        "{:?}",
        st.message
    );
    assert!(!st.failed.is_empty());
    assert!(st
        .failed
        .iter()
        .all(|f| f.error == ErrorKind::ConnectionLost));
    let msg = st.message.unwrap();
    assert!(
        msg.starts_with("push of transfer \"req-killed\" to engine ")
            && msg.contains("connection to peer lost"),
        "{msg}"
    );
    src.deregister(Duration::from_secs(5)).unwrap();
}
