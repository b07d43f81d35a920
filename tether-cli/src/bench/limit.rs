//! The physical limit of the throughput workloads: the bytes a workload
//! moves, pushed through loopback by the simplest program that can move
//! them. One writer task writes them into a plain tokio `TcpStream` in
//! [`WRITE_SIZE`] writes, one reader task reads them out of the other end
//! into a buffer of the same size; no framing, no encoding, no per-message
//! work at all.
//!
//! No system that carries messages over loopback TCP can beat it on the
//! same machine, so every system's figure can also be read as a fraction of
//! it: how much of what the machine can move the system gets.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::systems::finished;

/// The limit's key in the JSON report and in `--systems`.
pub(crate) const KEY: &str = "loopback_limit";

/// The limit's column title in the table.
pub(crate) const LABEL: &str = "loopback limit";

/// Bytes per write and per read.
pub(crate) const WRITE_SIZE: usize = 256 * 1024;

/// The bytes one message of a `size`-byte payload takes once encoded (the
/// postcard length prefix and the payload), without any framing: what every
/// system must deliver per message at the least.
pub(crate) fn encoded_len(size: usize) -> anyhow::Result<usize> {
    Ok(postcard::to_allocvec(&super::systems::payload(size))?.len())
}

/// Pushes `bytes` bytes from one end of a fresh loopback connection to the
/// other. Returns the time from the first write to the last read; the
/// connection is set up before and closed after.
pub(crate) async fn push(bytes: u64) -> anyhow::Result<Duration> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (mut writer, (mut reader, _)) = (client?, accepted?);
    // As the Framed baseline and tether's TCP links do; with writes this
    // large it changes at most the last segment.
    writer.set_nodelay(true)?;
    reader.set_nodelay(true)?;
    let receiver = tokio::spawn(async move {
        let mut buf = vec![0u8; WRITE_SIZE];
        let mut got = 0u64;
        while got < bytes {
            match reader.read(&mut buf).await? {
                0 => break,
                n => got += n as u64,
            }
        }
        anyhow::Ok((Instant::now(), got))
    });
    let sender = tokio::spawn(async move {
        let buf: Vec<u8> = (0..WRITE_SIZE).map(|i| (i * 31 + 7) as u8).collect();
        let start = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(WRITE_SIZE as u64) as usize;
            writer.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        anyhow::Ok((start, writer))
    });
    let (start, writer) = finished(sender, "loopback writer").await?;
    let (end, got) = finished(receiver, "loopback reader").await?;
    drop(writer);
    if got != bytes {
        bail!("delivery check failed: the reader got {got} of {bytes} bytes");
    }
    Ok(end - start)
}
