//! Reading and writing data-plane frames on a byte stream (a QUIC stream in the cluster):
//! the header first, checked, then exactly the body it announces.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::{Frame, Header, WireError, HEADER_LEN};

/// A failure to read or write a frame.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stream closed before a whole frame arrived")]
    Closed,
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed frame: {0}")]
    Wire(#[from] WireError),
    #[error("bytes after the stream's one frame")]
    Trailing,
}

/// Reads one frame. The body is allocated only after the header has passed its checks, so a
/// peer cannot make this allocate more than the kind's limit.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, StreamError> {
    let mut hb = [0u8; HEADER_LEN];
    read_exact(r, &mut hb).await?;
    let h = Header::decode(&hb)?;
    // Read into spare capacity: the body is not zeroed first (a vector's worth per frame).
    let mut body = Vec::with_capacity(h.body_len);
    (&mut *r)
        .take(h.body_len as u64)
        .read_to_end(&mut body)
        .await?;
    if body.len() < h.body_len {
        return Err(StreamError::Closed);
    }
    Ok(Frame::decode(&h, &body)?)
}

/// Reads a stream's one frame and then its end. Reading the stream to its end, rather than
/// dropping it after the frame, lets QUIC retire it without a STOP_SENDING of its own (a
/// packet, and a wake-up at the peer, per request); the sender's end-of-stream normally
/// arrives with the frame's last bytes, so this waits for nothing more.
pub async fn read_only_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, StreamError> {
    let f = read_frame(r).await?;
    let mut extra = [0u8; 1];
    match r.read(&mut extra).await? {
        0 => Ok(f),
        _ => Err(StreamError::Trailing),
    }
}

/// Writes an encoded frame.
pub async fn write_bytes<W: AsyncWrite + Unpin>(w: &mut W, b: &[u8]) -> Result<(), StreamError> {
    w.write_all(b).await?;
    Ok(())
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), StreamError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(StreamError::Closed),
        Err(e) => Err(StreamError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Dtype, ExpertRequest};

    #[tokio::test]
    async fn frames_cross_a_byte_stream_and_bad_ones_are_refused() {
        let req = ExpertRequest {
            request_id: 5,
            layer: 1,
            hidden: 3,
            dtype: Dtype::F32,
            counts: vec![1],
            experts: vec![2],
            weights: vec![0.5],
            xs: vec![1.0, 2.0, 3.0],
        };
        let mut b = Vec::new();
        req.encode(&mut b).unwrap();
        let (mut a, mut z) = tokio::io::duplex(64);
        let b2 = b.clone();
        let writer = tokio::spawn(async move {
            write_bytes(&mut a, &b2).await.unwrap();
            write_bytes(&mut a, &b2[..30]).await.unwrap();
        });
        assert_eq!(
            read_frame(&mut z).await.unwrap(),
            Frame::Request(req.clone())
        );
        writer.await.unwrap();
        // The second frame is cut short: a clean `Closed`, not a hang or a panic.
        assert!(matches!(read_frame(&mut z).await, Err(StreamError::Closed)));
        // One frame and then the end: accepted; anything after it: refused.
        let mut r = &b[..];
        assert_eq!(
            read_only_frame(&mut r).await.unwrap(),
            Frame::Request(req.clone())
        );
        let mut two = b.clone();
        two.push(0);
        let mut r = &two[..];
        assert!(matches!(
            read_only_frame(&mut r).await,
            Err(StreamError::Trailing)
        ));
        // A header announcing a huge body is refused before anything is allocated.
        let mut huge = b.clone();
        huge[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut r = &huge[..];
        assert!(matches!(
            read_frame(&mut r).await,
            Err(StreamError::Wire(WireError::TooLarge { .. }))
        ));
    }
}
