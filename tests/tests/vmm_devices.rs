//! ftvmm's virtio devices with a real guest inside a lab node: a virtio-blk
//! disk keeps what the guest wrote across ftvmm runs, and virtio-net on a
//! TAP carries TCP traffic between the guest and the outer host.
//!
//! The guest runs a shell script that the test places on a small raw,
//! read-only disk (vda): `ftguest.run=/bin/sh,/dev/vda`. The script ends
//! with `exit` before the zero padding.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use ft_tests::guest::{guest_console_after_reset, run_ftvmm};
use ft_tests::{LabPair, NodeId};

const SCRIPT_DISK: &str = "/data/script.img";

/// Places `script` on the raw script disk in node A.
fn put_script(lab: &LabPair, script: &str) {
    let script = format!("{script}\nexit 0\n");
    assert!(script.len() < 64 * 1024, "script too long");
    lab.sh(
        NodeId::A,
        &format!("cat > {SCRIPT_DISK} <<'FTEOF'\n{script}FTEOF\ntruncate -s 64K {SCRIPT_DISK}"),
    );
}

/// Runs ftvmm in node A with the script disk first and `extra_args`;
/// returns the console after checking that ftvmm exited 0 on the guest's
/// reboot.
fn run_guest(lab: &LabPair, vcpus: u8, cmdline_extra: &str, extra_args: &[&str]) -> String {
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=1 quiet ftguest.run=/bin/sh,/dev/vda \
         ftguest.then=reboot {cmdline_extra}"
    );
    let script_disk = format!("{SCRIPT_DISK},ro");
    let mut args = vec!["--disk", script_disk.as_str()];
    args.extend_from_slice(extra_args);
    guest_console_after_reset(run_ftvmm(
        lab,
        NodeId::A,
        "/images/vmlinux",
        vcpus,
        &cmdline,
        &args,
    ))
}

/// Like `run_guest` with one NIC on TAP `tap`, which ftvmm creates and
/// which is put on bridge br0 as soon as it exists.
fn run_guest_with_tap(lab: &LabPair, guest_ip: &str, tap: &str, mac: &str) -> String {
    let script = format!(
        "(timeout 100 ftvmm run --kernel /images/vmlinux \
         --initrd /images/guest-initramfs.cpio.gz --vcpus 1 --mem-mib 256 \
         --cmdline 'console=ttyS0 reboot=k panic=1 quiet ftguest.run=/bin/sh,/dev/vda \
         ftguest.then=reboot ftguest.ip={guest_ip}/24' \
         --disk {SCRIPT_DISK},ro --net tap={tap},mac={mac} \
         >/data/net.out 2>/data/net.err; echo $? >/data/net.rc) &\n\
         for i in $(seq 100); do ip link show {tap} >/dev/null 2>&1 && break; sleep 0.1; done\n\
         ip link set {tap} master br0 up\n\
         wait\n\
         cat /data/net.out; cat /data/net.err >&2; exit $(cat /data/net.rc)"
    );
    guest_console_after_reset(lab.exec(NodeId::A, &["sh", "-c", &script]))
}

/// The value of `key=` on a console line starting with `ftest:`.
fn figure(console: &str, key: &str) -> String {
    let prefix = format!("{key}=");
    console
        .lines()
        .filter(|l| l.starts_with("ftest:"))
        .flat_map(|l| l.split_whitespace())
        .find_map(|w| w.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key}= on the console:\n{console}"))
        .to_string()
}

fn seconds(console: &str, from: &str, to: &str) -> f64 {
    let a: f64 = figure(console, from).parse().expect("uptime");
    let b: f64 = figure(console, to).parse().expect("uptime");
    b - a
}

#[test]
fn virtio_blk_data_survives_the_vmm_and_is_read_back_after_a_fresh_boot() {
    let lab = LabPair::start_nodes("e2e", &[NodeId::A]);
    let marker = format!("FTBLK-{:x}", std::process::id() as u64 * 7919 + 12345);
    // The data disk: a copy of the guest's ext4 root image (mounted on /data
    // by the guest's init).
    lab.sh(
        NodeId::A,
        "cp /images/guest-rootfs.ext4 /data/vm-data.ext4 && sync",
    );
    let size_mib = 16;
    put_script(
        &lab,
        &format!(
            "echo ftest: serial=$(cat /sys/block/vda/serial) vdb_sectors=$(cat /sys/block/vdb/size)\n\
             mount | grep -q 'vdb on /data type ext4' || {{ echo 'ftest: /data not mounted'; exit 1; }}\n\
             echo {marker} > /data/marker.txt\n\
             dd if=/dev/urandom of=/tmp/big bs=1M count={size_mib} 2>/dev/null\n\
             md5sum /tmp/big | cut -d' ' -f1 > /data/big.md5\n\
             echo ftest: t0=$(cut -d' ' -f1 /proc/uptime)\n\
             dd if=/tmp/big of=/data/big bs=1M conv=fsync 2>/dev/null\n\
             sync\n\
             echo ftest: t1=$(cut -d' ' -f1 /proc/uptime) md5=$(cat /data/big.md5)"
        ),
    );
    let console = run_guest(&lab, 1, "", &["--disk", "/data/vm-data.ext4"]);
    assert_eq!(figure(&console, "serial"), "script.img", "{console}");
    assert_eq!(figure(&console, "vdb_sectors"), "262144", "{console}");
    let md5 = figure(&console, "md5");
    let write_secs = seconds(&console, "t0", "t1");
    eprintln!(
        "[e2e] virtio-blk: guest wrote {size_mib} MiB + fsync in {write_secs:.2}s ({:.1} MiB/s)",
        size_mib as f64 / write_secs
    );

    // After ftvmm exited, the marker is in the image file in the node.
    let hits = lab.sh(
        NodeId::A,
        &format!("grep -c -a {marker} /data/vm-data.ext4 || true"),
    );
    let hits: u32 = hits.trim().parse().expect("grep count");
    assert!(hits >= 1, "the marker is not in the backing file");
    eprintln!("[e2e] virtio-blk: marker found {hits} time(s) in the backing file");

    // A fresh ftvmm reads the files back.
    put_script(
        &lab,
        "echo ftest: marker=$(cat /data/marker.txt)\n\
         echo 3 > /proc/sys/vm/drop_caches\n\
         echo ftest: t0=$(cut -d' ' -f1 /proc/uptime)\n\
         echo ftest: md5=$(md5sum /data/big | cut -d' ' -f1)\n\
         echo ftest: t1=$(cut -d' ' -f1 /proc/uptime)",
    );
    let console = run_guest(&lab, 1, "", &["--disk", "/data/vm-data.ext4"]);
    assert_eq!(figure(&console, "marker"), marker, "{console}");
    assert_eq!(figure(&console, "md5"), md5, "{console}");
    let read_secs = seconds(&console, "t0", "t1");
    eprintln!(
        "[e2e] virtio-blk: fresh boot read {size_mib} MiB back intact in {read_secs:.2}s ({:.1} MiB/s)",
        size_mib as f64 / read_secs
    );
}

fn md5_on_host(data: &[u8]) -> String {
    let path = std::env::temp_dir().join(format!("ftvmm-net-{}.bin", std::process::id()));
    std::fs::write(&path, data).expect("write temp file");
    let out = Command::new("md5sum").arg(&path).output().expect("md5sum");
    let _ = std::fs::remove_file(&path);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("md5sum output")
        .to_string()
}

#[test]
fn virtio_net_guest_exchanges_tcp_with_the_outer_host() {
    let lab = LabPair::start_nodes("e2e", &[NodeId::A]);
    let topo = &lab.lab().topo;
    let host_ip = topo.host_biz_ip();
    let node_ip = topo.biz_ip(NodeId::A);
    let octets = node_ip.octets();
    let guest_ip = format!("{}.{}.{}.100", octets[0], octets[1], octets[2]);

    // The node's business NIC is on bridge br0 from boot (images/node/rcS);
    // ftvmm creates the TAP (busybox has no `ip tuntap`), which then joins
    // the bridge.
    assert!(
        lab.sh(NodeId::A, "ip -4 addr show br0")
            .contains(&node_ip.to_string()),
        "br0 does not hold the node's business address"
    );

    // The outer host: one connection receives what the guest sends, the
    // next sends the guest a pattern.
    let listener = TcpListener::bind(SocketAddr::new(host_ip.into(), 0)).expect("bind");
    let port = listener.local_addr().unwrap().port();
    let to_guest: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let expected_md5 = md5_on_host(&to_guest);
    let from_guest_len = 2usize << 20;
    let (tx, rx) = channel();
    let pattern = to_guest.clone();
    std::thread::spawn(move || {
        let (mut up, peer) = listener.accept().expect("accept upload");
        up.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let start = Instant::now();
        let mut got = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        let mut nonzero = 0usize;
        while total < from_guest_len {
            match up.read(&mut got) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    nonzero += got[..n].iter().filter(|&&b| b != 0).count();
                    total += n;
                }
            }
        }
        let up_secs = start.elapsed().as_secs_f64();
        drop(up);
        let (mut down, _) = listener.accept().expect("accept download");
        let start = Instant::now();
        let sent = down.write_all(&pattern).is_ok();
        drop(down);
        let _ = tx.send((
            peer,
            total,
            nonzero,
            up_secs,
            sent,
            start.elapsed().as_secs_f64(),
        ));
    });

    put_script(
        &lab,
        &format!(
            "echo ftest: mac=$(cat /sys/class/net/eth0/address)\n\
             ok=1; for i in 1 2 3 4 5 6 7 8 9 10; do ping -c 1 -W 2 {host_ip} >/dev/null 2>&1 && {{ ok=0; break; }}; done\n\
             echo ftest: ping=$ok tries=$i\n\
             echo ftest: t0=$(cut -d' ' -f1 /proc/uptime)\n\
             dd if=/dev/zero bs=64k count={count} 2>/dev/null | nc {host_ip} {port}\n\
             echo ftest: t1=$(cut -d' ' -f1 /proc/uptime)\n\
             nc {host_ip} {port} </dev/null > /tmp/rx\n\
             echo ftest: t2=$(cut -d' ' -f1 /proc/uptime)\n\
             echo ftest: rx_bytes=$(wc -c < /tmp/rx) rx_md5=$(md5sum /tmp/rx | cut -d' ' -f1)",
            count = from_guest_len / (64 * 1024)
        ),
    );
    let console = run_guest_with_tap(&lab, &guest_ip, "tap0", "52:54:00:12:34:56");
    assert_eq!(figure(&console, "mac"), "52:54:00:12:34:56", "{console}");
    assert_eq!(figure(&console, "ping"), "0", "{console}");
    let (peer, up_bytes, up_nonzero, up_secs, sent, down_secs) = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("the host side did not finish:\n{console}"));
    assert_eq!(peer.ip().to_string(), guest_ip);
    assert_eq!(up_bytes, from_guest_len, "bytes from the guest\n{console}");
    assert_eq!(up_nonzero, 0, "the guest sent zeros");
    assert!(sent, "sending to the guest failed");
    assert_eq!(
        figure(&console, "rx_bytes"),
        to_guest.len().to_string(),
        "{console}"
    );
    assert_eq!(figure(&console, "rx_md5"), expected_md5, "{console}");
    let guest_tx = seconds(&console, "t0", "t1");
    let guest_rx = seconds(&console, "t1", "t2");
    eprintln!(
        "[e2e] virtio-net: guest -> host {} MiB in {guest_tx:.2}s guest time ({:.1} MiB/s; host saw {up_secs:.2}s)",
        from_guest_len >> 20,
        (from_guest_len >> 20) as f64 / guest_tx
    );
    eprintln!(
        "[e2e] virtio-net: host -> guest {} MiB intact in {guest_rx:.2}s guest time ({:.1} MiB/s; host wrote in {down_secs:.2}s)",
        to_guest.len() >> 20,
        (to_guest.len() >> 20) as f64 / guest_rx
    );
}
