//! Writes the seed inputs of every fuzz target into `corpus/<target>/`
//! (`seed-*` files): real frames, messages, records and states made by the
//! project's own encoders, so that fuzzing starts from what the wire
//! carries. Run from `fuzz/`: `cargo run --example seeds`, then minimise
//! (`cargo fuzz cmin <target>`, see scripts/fuzz.sh).

use std::path::Path;

use bytes::{Bytes, BytesMut};
use ft_link::auth::{self, Nonce, Side};
use ft_link::hello::{Mismatch, PROTOCOL_VERSION};
use ft_link::{pulse, CpuFeatureSummary, Frame, FrameKind, Hello, PairSecret, Refusal, Role};
use ftvm_fuzz::{local_hello, Op, PAIR_SECRET, PROVER_NONCE, PULSE_KEY, VERIFIER_NONCE};
use replicator::protocol::{
    disk_payloads, encode_pages, epoch_frames, CheckpointState, DiskRecord, Message, PageBatch,
    PageStager, SyncPlan, PAGE_SIZE, SYNC_PLAN_VERSION,
};
use serde_json::json;
use vmm::replication::PageSink;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn wire(frames: &[Frame]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for f in frames {
        f.encode(&mut out).unwrap();
    }
    out.to_vec()
}

fn plan() -> SyncPlan {
    SyncPlan {
        version: SYNC_PLAN_VERSION,
        mem_mib: 128,
        disk_bytes: vec![64 << 10, 256 << 10],
        nics: 1,
        content_key: "5a".repeat(32),
        level: Default::default(),
        boot: None,
        written: Vec::new(),
        next_common: None,
        memory_lineage: None,
        memory_since: None,
    }
}

/// A kvm-bindings struct as JSON: its bytes (short arrays are zero-filled).
fn kvm(bytes: &[u8]) -> serde_json::Value {
    json!(bytes)
}

fn checkpoint_state(with_devices: bool) -> Vec<u8> {
    let vcpus = if with_devices {
        json!([{
            "version": 1, "index": 0,
            "cpuid": [kvm(&[0, 0, 0, 0, 0, 0, 0, 0, 0x0d])],
            "mp_state": kvm(&[]), "regs": kvm(&[0x10, 0, 0, 0]), "sregs": kvm(&[]),
            "xsave": kvm(&[0x7f, 3]), "xcrs": kvm(&[1]), "debug_regs": kvm(&[]),
            "lapic": kvm(&[]), "msrs": [kvm(&[0x10, 0, 0, 0])], "events": kvm(&[]),
            "tsc_khz": 2_000_000,
        }])
    } else {
        json!([])
    };
    let virtio = if with_devices {
        let transport = |device_type: u32| {
            json!({
                "version": 1, "device_type": device_type, "status": 15,
                "device_features_select": 0, "driver_features_select": 1,
                "acked_features": 1u64 << 32, "queue_select": 0, "interrupt_status": 0,
                "config_generation": 0,
                "queues": [{"max_size": 256, "size": 256, "ready": true,
                            "desc_table": 0x10000, "avail_ring": 0x11000, "used_ring": 0x12000,
                            "next_avail": 7, "next_used": 7}],
            })
        };
        json!([
            {"config": {"disk": {"path": "/var/lib/ftvm/disk.img", "read_only": false}},
             "device": {"block": {"version": 1, "read_only": false, "capacity_sectors": 2048}},
             "transport": transport(2)},
            {"config": {"net": {"tap": "ft-tap0", "mac": [0x52, 0x54, 0, 0x12, 0x34, 0x56]}},
             "device": {"net": {"version": 1, "mac": [0x52, 0x54, 0, 0x12, 0x34, 0x56]}},
             "transport": transport(1)},
        ])
    } else {
        json!([])
    };
    let value = json!({
        "version": replicator::protocol::CHECKPOINT_STATE_VERSION,
        "guest_ipv4": [[10, 77, 0, 100]],
        "inbound_through": [],
        "machine": {
            "version": 1, "captured_unix_ns": 1_700_000_000_000_000_000u64,
            "vcpu_count": 1, "mem_mib": 128, "msr_indices": [0x10, 0xc000_0080u32],
            "cpu_features": if with_devices { "host" } else { "x86-64-v2" },
            "vcpus": vcpus,
            "vm": {"version": 1, "pic_master": kvm(&[]), "pic_slave": kvm(&[1]),
                   "ioapic": kvm(&[2]), "pit": kvm(&[]), "clock": kvm(&[9, 9])},
            "serial": {"version": 1, "baud_divisor_low": 1, "baud_divisor_high": 0,
                       "interrupt_enable": 0, "interrupt_identification": 1,
                       "line_control": 3, "line_status": 0x60, "modem_control": 8,
                       "modem_status": 0xb0, "scratch": 0, "in_buffer": [104, 105]},
            "virtio": virtio,
        },
    });
    // Decoded from JSON (the KVM structs' short arrays zero-filled), then
    // encoded as the primary sends it.
    let state: CheckpointState = serde_json::from_value(value).expect("a valid state");
    let payload = state.to_payload().unwrap();
    assert!(
        payload.len() <= 8192,
        "the target's inputs are at most 8 KiB"
    );
    payload
}

fn pages_payload(pages: &[(u64, u8)]) -> Bytes {
    let mut stager = PageStager::default();
    for &(gpa, fill) in pages {
        stager
            .page_buffer(gpa)
            .extend_from_slice(&[fill; PAGE_SIZE]);
    }
    stager
        .finish()
        .batches
        .into_iter()
        .flat_map(|b| b.into_bytes())
        .collect::<Vec<u8>>()
        .into()
}

fn disk_payload(records: &[(u32, u64, &'static [u8])]) -> Bytes {
    let (batches, _) = disk_payloads(records.iter().map(|&(disk, offset, data)| DiskRecord {
        disk,
        offset,
        data: Bytes::from_static(data),
    }));
    batches
        .into_iter()
        .flat_map(|b| b.into_bytes())
        .collect::<Vec<u8>>()
        .into()
}

/// An epoch of one page and one disk write, as the primary sends it.
fn an_epoch(epoch: u64, state: Bytes) -> Vec<Frame> {
    let mut stager = PageStager::default();
    stager
        .page_buffer(5 * 4096)
        .extend_from_slice(&[epoch as u8; PAGE_SIZE]);
    let writes = disk_payloads([DiskRecord {
        disk: 0,
        offset: 512,
        data: Bytes::from_static(b"epoch data"),
    }]);
    epoch_frames(epoch, 1, state, stager.finish(), writes)
}

fn frame_decoder() {
    let secret = PairSecret::new(PAIR_SECRET).unwrap();
    let verifier = Nonce::from_wire(&VERIFIER_NONCE).unwrap();
    let prover = Nonce::from_wire(&PROVER_NONCE).unwrap();
    let proof = auth::prove(&secret, Side::Connecting, &verifier, &prover);
    let peer = Hello::new(
        "fuzz-peer",
        Role::Primary,
        local_hello().cpu.clone(),
        "vm-fingerprint",
    );
    let handshake = vec![
        Frame::new(FrameKind::Challenge, 0, PROVER_NONCE.to_vec()),
        Frame::new(FrameKind::Response, 0, proof.to_vec()),
        Frame::new(FrameKind::Hello, 0, peer.to_payload().unwrap()),
        Frame::new(FrameKind::Accepted, 0, 7301u16.to_be_bytes().to_vec()),
        Frame::new(FrameKind::Heartbeat, 0, Bytes::new()),
    ];
    let mismatch = Mismatch::CpuFeatures {
        local_node: "a".into(),
        local_name: "host".into(),
        local_words: 2,
        peer_node: "b".into(),
        peer_name: "x86-64-v2".into(),
        peer_words: 3,
        differing: vec![1, 2],
    };
    let incompatible = Hello {
        protocol_version: PROTOCOL_VERSION + 1,
        node_name: "fuzz-other".into(),
        role: Role::Standby,
        cpu: CpuFeatureSummary {
            name: "host".into(),
            words: vec![9],
        },
        vm_fingerprint: "other".into(),
    };
    let refusals = vec![
        Frame::new(FrameKind::Hello, 0, incompatible.to_payload().unwrap()),
        Frame::new(
            FrameKind::Refusal,
            0,
            Refusal::AuthenticationFailed.to_payload().unwrap(),
        ),
        Frame::new(
            FrameKind::Refusal,
            0,
            Refusal::Incompatible(Box::new(mismatch))
                .to_payload()
                .unwrap(),
        ),
        Frame::new(
            FrameKind::Refusal,
            0,
            Refusal::ProtocolViolation("expected Challenge".into())
                .to_payload()
                .unwrap(),
        ),
    ];
    let mut session = vec![Message::SyncBegin(Box::new(plan())).into_frame(0, 1)];
    session.extend(an_epoch(1, Bytes::from_static(b"{}")));
    session.push(Message::Ack.into_frame(1, 1));
    for (i, (chunking, frames)) in [
        (0u8, &handshake),
        (5, &refusals),
        (2, &session),
        (7, &handshake),
    ]
    .into_iter()
    .enumerate()
    {
        let mut input = vec![chunking];
        input.extend(wire(frames));
        write("frame_decoder", &format!("stream-{i}"), &input);
    }
    // A torn frame, and pulses.
    let mut torn = vec![3u8];
    torn.extend(&wire(&session)[..100]);
    write("frame_decoder", "torn", &torn);
    for (i, side) in [Side::Connecting, Side::Accepting].into_iter().enumerate() {
        let mut input = vec![0u8];
        input.extend(pulse::encode(&PULSE_KEY, side, 42 + i as u64));
        write("frame_decoder", &format!("pulse-{i}"), &input);
    }
}

fn epoch_assembler() {
    let state_frame = |delta: i8| Op::Frame {
        kind: 4, // EpochBegin
        delta,
        payload: b"{\"state\":1}".to_vec(),
    };
    let two_epochs = vec![
        state_frame(0),
        Op::Pages {
            delta: 0,
            pages: vec![(0, 1), (5 * 4096, 2), (4095 * 4096, 3)],
        },
        Op::DiskWrites {
            delta: 0,
            writes: vec![(0, 512, 10, 0xaa), (1, 4096, 512, 0xbb), (0, 520, 4, 0xcc)],
        },
        Op::Pages {
            delta: 0,
            pages: vec![(5 * 4096, 4)],
        },
        Op::End {
            delta: 0,
            tamper: 0,
        },
        Op::Apply,
        state_frame(0),
        Op::Pages {
            delta: 0,
            pages: vec![(4096, 9)],
        },
        Op::End {
            delta: 0,
            tamper: 0,
        },
        Op::Apply,
        Op::Apply,
    ];
    let wild = vec![
        state_frame(0),
        Op::Pages {
            delta: 0,
            pages: vec![(4096, 1)],
        },
        Op::End {
            delta: 0,
            tamper: 4,
        },
        state_frame(0),
        Op::Pages {
            delta: 0,
            pages: vec![(16 << 20, 1), (17, 2), (u64::MAX - 4095, 3)],
        },
        Op::DiskWrites {
            delta: 0,
            writes: vec![(2, 0, 1, 1), (0, (64 << 10) - 1, 2, 1)],
        },
        Op::End {
            delta: 0,
            tamper: 0,
        },
        Op::Apply,
    ];
    let disorder = vec![
        Op::Pages {
            delta: 0,
            pages: vec![(0, 1)],
        },
        state_frame(1),
        state_frame(-1),
        state_frame(0),
        state_frame(0),
        state_frame(0),
        Op::Pages {
            delta: 1,
            pages: vec![(0, 1)],
        },
        state_frame(0),
        Op::Abort,
        state_frame(0),
        Op::End {
            delta: 0,
            tamper: 0,
        },
        Op::Frame {
            kind: 8, // Ack
            delta: 0,
            payload: vec![],
        },
        Op::Apply,
        Op::Apply,
    ];
    // The primary's own frames, as raw message ops.
    let mut raw = Vec::new();
    for f in encode_pages(
        1,
        0,
        Bytes::from_static(b"{}"),
        [(0u64, &[1u8; PAGE_SIZE][..]), (8192, &[2u8; PAGE_SIZE][..])],
    ) {
        let FrameKind::Message(code) = f.kind else {
            unreachable!()
        };
        raw.push(Op::Frame {
            kind: code - 64,
            delta: 0,
            payload: f.payload.to_vec(),
        });
    }
    raw.push(Op::Apply);
    for (i, ops) in [two_epochs, wild, disorder, raw].iter().enumerate() {
        let mut input = Vec::new();
        for op in ops {
            op.encode(&mut input);
        }
        write("epoch_assembler", &format!("ops-{i}"), &input);
    }
}

fn page_records() {
    write("page_records", "empty", &[]);
    write("page_records", "one", &pages_payload(&[(4096, 1)]));
    write(
        "page_records",
        "three",
        &pages_payload(&[(0, 0), (16 << 20, 2), (u64::MAX - 4095, 3)]),
    );
    write("page_records", "unaligned", &pages_payload(&[(4097, 7)]));
}

fn disk_records() {
    write("disk_records", "empty", &[]);
    write(
        "disk_records",
        "one",
        &disk_payload(&[(0, 512, b"hello disk")]),
    );
    write(
        "disk_records",
        "three",
        &disk_payload(&[
            (0, 0, b"a"),
            (1, 1 << 40, b"bb"),
            (u32::MAX, u64::MAX, b"ccc"),
        ]),
    );
}

fn checkpoint_state_seeds() {
    write("checkpoint_state", "minimal", &checkpoint_state(false));
    write("checkpoint_state", "devices", &checkpoint_state(true));
}

fn sync_plan() {
    write("sync_plan", "plan", &plan().to_payload());
    let mapped = SyncPlan {
        written: vec![
            Some(replicator::protocol::WrittenPlan {
                common: Some("11".repeat(16)),
                extents: vec![(0, 1), (3, 9)],
            }),
            None,
        ],
        next_common: Some("22".repeat(16)),
        ..plan()
    };
    write("sync_plan", "written-maps", &mapped.to_payload());
    let none = SyncPlan {
        disk_bytes: vec![],
        nics: 0,
        ..plan()
    };
    write("sync_plan", "no-devices", &none.to_payload());
    write(
        "sync_plan",
        "spaced",
        concat!(
            "{ \"version\": 3, \"mem_mib\": 18446744073709551615, \"disk_bytes\": [0, 1e3], ",
            "\"nics\": 2, \"content_key\": \"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\" }"
        )
        .as_bytes(),
    );
}

fn protocol_message() {
    let (disks, _) = disk_payloads([DiskRecord {
        disk: 0,
        offset: 4096,
        data: Bytes::from_static(b"disk"),
    }]);
    let pages = PageBatch::new(pages_payload(&[(4096, 3)])).unwrap();
    let mut messages = vec![
        Message::SyncBegin(Box::new(plan())),
        Message::SyncPages(pages.clone()),
        Message::SyncDisk(disks[0].clone()),
        Message::Backup,
        Message::Pages(pages),
        Message::DiskWrites(disks[0].clone()),
        Message::Ack,
        Message::Stop,
        Message::Handover,
        Message::Switchover,
        Message::SyncEnd(replicator::protocol::EpochEnd {
            pages: 1,
            pages_crc: 2,
            writes: 3,
            writes_crc: 4,
        }),
        Message::Refuse("the standby on node-b: no space for the replica disk".into()),
        Message::SyncHeld(replicator::protocol::Held {
            region: replicator::protocol::Region::Disk(1),
            part: replicator::protocol::HeldPart::Digests {
                first_chunk: 0,
                digests: vec![[7; 16]; 4],
            },
        }),
    ];
    // Appended, so that the seeds before keep their names.
    let mapped = Message::SyncHeld(replicator::protocol::Held {
        region: replicator::protocol::Region::Disk(0),
        part: replicator::protocol::HeldPart::Same {
            first_chunk: 16,
            count: 32,
        },
    });
    let epoch = an_epoch(2, Bytes::from(checkpoint_state(false)));
    messages.extend(
        epoch
            .into_iter()
            .map(|f| Message::from_frame(f).unwrap().message),
    );
    messages.push(mapped);
    // Appended too: pages as deltas (a word changed, a run of three, a
    // mostly-zero page).
    let mut deltas = replicator::protocol::PageDeltaStager::default();
    let old = vec![1u8; PAGE_SIZE];
    let mut new = old.clone();
    new[16] = 2;
    deltas.add(0, &old, &new);
    new[1000..1024].fill(3);
    deltas.add(8192, &old, &new);
    // And a mostly-zero page, from a page of zeros.
    let mut sparse = vec![0u8; PAGE_SIZE];
    sparse[24] = 9;
    deltas.add_from_zero(12288, &sparse);
    messages.push(Message::PageDeltas(deltas.finish().remove(0)));
    // Appended too: a state as what changed since the one before (two
    // chunks, one word changed in the second).
    let old_state = vec![5u8; PAGE_SIZE + 100];
    let mut new_state = old_state.clone();
    new_state[PAGE_SIZE + 40] = 6;
    messages.push(Message::EpochStateDelta(
        replicator::protocol::StateDelta::encode(&old_state, &new_state, 1000)
            .expect("a state delta"),
    ));
    // Appended too: an epoch's page audit of two pages.
    let mut audit = replicator::protocol::PageAudit::default();
    audit.add(
        4096,
        replicator::protocol::Picked::Recent,
        &[1u8; PAGE_SIZE],
    );
    audit.add(8192, replicator::protocol::Picked::Delta, &[2u8; PAGE_SIZE]);
    messages.push(Message::EpochAudit(audit));
    for (i, m) in messages.into_iter().enumerate() {
        let f = m.into_frame(2 + i as u64, 1);
        let mut input = vec![f.kind.code()];
        input.extend(f.epoch.to_le_bytes());
        input.extend(f.generation.to_le_bytes());
        input.extend(&f.payload[..]);
        write("protocol_message", &format!("{i:02}"), &input);
    }
    // The copy's compressed frames: a page of a repeated byte and a disk
    // chunk of one, which zstd shrinks.
    let mut compressor = replicator::protocol::compressed::Compressor::new(3).unwrap();
    let (chunk, _) = disk_payloads([DiskRecord {
        disk: 0,
        offset: 1 << 16,
        data: Bytes::from(vec![9u8; 4096]),
    }]);
    let compressed = [
        Message::SyncPages(PageBatch::new(pages_payload(&[(8192, 5)])).unwrap()),
        Message::SyncDisk(chunk[0].clone()),
    ];
    for (i, m) in compressed.into_iter().enumerate() {
        let f = m.into_compressed_frame(0, 1, &mut compressor);
        assert!(Message::is_compressed_kind(f.kind.code()), "compressed");
        let mut input = vec![f.kind.code()];
        input.extend(f.epoch.to_le_bytes());
        input.extend(f.generation.to_le_bytes());
        input.extend(&f.payload[..]);
        write("protocol_message", &format!("z{i}"), &input);
    }
    let mut link = vec![FrameKind::Heartbeat.code()];
    link.extend([0u8; 16]);
    write("protocol_message", "link-frame", &link);
}

/// Seeds for `page_delta`: a seed of the old page, then deltas the
/// encoder made (a word changed, three runs, a whole page) and an empty one.
fn page_delta() {
    use replicator::protocol::delta::encode;
    let old = vec![0x5au8; PAGE_SIZE];
    let seed = 7u64.to_le_bytes();
    let mut changed = old.clone();
    changed[8] = 1;
    let mut runs = old.clone();
    runs[..16].fill(2);
    runs[800..880].fill(3);
    runs[PAGE_SIZE - 8..].fill(4);
    let whole = vec![0xa5u8; PAGE_SIZE];
    for (name, new) in [
        ("empty", &old),
        ("word", &changed),
        ("runs", &runs),
        ("whole", &whole),
    ] {
        let mut input = seed.to_vec();
        encode(&old, new, PAGE_SIZE * 2, &mut input).unwrap();
        write("page_delta", name, &input);
    }
}

fn main() {
    page_delta();
    frame_decoder();
    epoch_assembler();
    page_records();
    disk_records();
    checkpoint_state_seeds();
    sync_plan();
    protocol_message();
    println!("seeds written under corpus/");
}
