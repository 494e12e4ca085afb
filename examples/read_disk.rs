//! Reads one disk through vmrepo's readers exactly as ingest does — 4 MiB segments in order,
//! each segment's allocation map first, then one read per allocated range — and prints the
//! bytes read and the throughput. Used by scripts/bench-formats.sh to compare each sparse
//! reader with reading the same data flat.
//!
//! usage: read_disk DISK [PASSES]

use std::time::Instant;

use vmrepo::vmware::vm::open_source;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: read_disk DISK [PASSES]")?;
    let passes: u32 = args.next().map(|p| p.parse()).transpose()?.unwrap_or(1);
    let plan = open_source(std::path::Path::new(&path), Some("bench"))?;
    let disk = &plan.disks[0];
    let size = disk.reader.size();
    let seg = 4u64 << 20;
    let mut buf = vec![0u8; seg as usize];
    let mut best = f64::MAX;
    let mut read = 0u64;
    let mut fold = 0u8;
    for _ in 0..passes {
        let began = Instant::now();
        read = 0;
        let mut at = 0;
        while at < size {
            let end = (at + seg).min(size);
            for r in disk.reader.allocated(at..end)? {
                let b = &mut buf[..(r.end - r.start) as usize];
                disk.reader.read_at(b, r.start)?;
                fold ^= b[b.len() / 2];
                read += r.end - r.start;
            }
            at = end;
        }
        best = best.min(began.elapsed().as_secs_f64());
    }
    println!(
        "{path}\t{}\t{read}\t{best:.3}\t{:.1}\t{fold}",
        disk.create_type,
        read as f64 / best / (1 << 20) as f64
    );
    Ok(())
}
