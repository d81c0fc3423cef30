//! `ft-ledger PORT FILE`: the ledger service (see `guest_tools::ledger`).
//! Every APPEND is written to FILE and fsync'd before it is acknowledged;
//! FILE requests read the file back from the disk (its cached pages are
//! dropped first).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

struct Ledger {
    ids: Vec<u64>,
    file: File,
}

fn ids_line(tag: &str, ids: &[u64]) -> String {
    let mut s = format!("{tag} {}", ids.len());
    for id in ids {
        s.push(' ');
        s.push_str(&id.to_string());
    }
    s
}

fn read_back(ledger: &mut Ledger) -> std::io::Result<Vec<u64>> {
    ledger.file.sync_all()?;
    // SAFETY: posix_fadvise on an open descriptor this process owns; it
    // only drops clean cached pages, so the next read comes from the disk.
    unsafe { libc::posix_fadvise(ledger.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut text = String::new();
    ledger.file.seek(SeekFrom::Start(0))?;
    ledger.file.read_to_string(&mut text)?;
    ledger.file.seek(SeekFrom::End(0))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

fn answer(ledger: &Mutex<Ledger>, request: &str) -> String {
    let mut ledger = ledger.lock().expect("ledger lock");
    let mut words = request.split_ascii_whitespace();
    match (words.next(), words.next()) {
        (Some("APPEND"), Some(id)) => {
            let Ok(id) = id.parse::<u64>() else {
                return format!("ERR bad id {id:?}");
            };
            let written = ledger
                .file
                .write_all(format!("{id}\n").as_bytes())
                .and_then(|_| ledger.file.sync_data());
            match written {
                Ok(()) => {
                    ledger.ids.push(id);
                    format!("OK {id} {}", ledger.ids.len())
                }
                Err(e) => format!("ERR write failed: {e}"),
            }
        }
        (Some("DUMP"), None) => ids_line("MEM", &ledger.ids),
        (Some("FILE"), None) => match read_back(&mut ledger) {
            Ok(ids) => ids_line("FILE", &ids),
            Err(e) => format!("ERR read failed: {e}"),
        },
        _ => format!("ERR unknown request {request:?}"),
    }
}

fn serve(conn: TcpStream, ledger: Arc<Mutex<Ledger>>) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        let reply = answer(&ledger, line.trim());
        if out.write_all(format!("{reply}\n").as_bytes()).is_err() {
            return;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(port), Some(path)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: ft-ledger PORT FILE");
        std::process::exit(2);
    };
    let file = match OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ft-ledger: cannot open {path}: {e}");
            std::process::exit(2);
        }
    };
    let mut ledger = Ledger {
        ids: Vec::new(),
        file,
    };
    match read_back(&mut ledger) {
        Ok(ids) => ledger.ids = ids,
        Err(e) => {
            eprintln!("ft-ledger: cannot read {path}: {e}");
            std::process::exit(2);
        }
    }
    let listener = match TcpListener::bind(("0.0.0.0", port.parse().unwrap_or(7000))) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ft-ledger: cannot listen on port {port}: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "ft-ledger: serving {path} on port {port} ({} entries)",
        ledger.ids.len()
    );
    let ledger = Arc::new(Mutex::new(ledger));
    for conn in listener.incoming().flatten() {
        let ledger = Arc::clone(&ledger);
        std::thread::spawn(move || serve(conn, ledger));
    }
}
