//! A response body that holds a turn (a semaphore permit) until the connection has taken its
//! bytes: a large answer built within a turn stays within it while it is sent.
//!
//! The API builds a whole dead-letter listing (up to 16 MiB) or one dead letter (a few MiB) in
//! one of two turns, so no more than two such copies are made at once. Released once the body
//! was built, the turn bounded only the building: a client that read a few KiB every half
//! minute held each answer for hours, and 128 connections from one address held 2 GiB (review
//! 60a H1). Sent here in 64 KiB frames, the answer is polled for more only as the client reads
//! (hyper buffers a few hundred KiB of it), and the turn is let go with its last frame, or when
//! the connection ends first.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::OwnedSemaphorePermit;

/// The bytes handed to hyper per frame.
const FRAME_BYTES: usize = 64 << 10;

/// `data`, sent holding `turn` (see the module's doc).
pub struct TurnHeldBody {
    data: Bytes,
    sent: usize,
    turn: Option<OwnedSemaphorePermit>,
}

impl TurnHeldBody {
    /// `data` to send, holding `turn` until its last frame is taken.
    pub fn new(data: impl Into<Bytes>, turn: Option<OwnedSemaphorePermit>) -> Self {
        Self { data: data.into(), sent: 0, turn }
    }

    /// Whether the turn is held still.
    pub fn holds_turn(&self) -> bool {
        self.turn.is_some()
    }
}

impl Body for TurnHeldBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.sent >= this.data.len() {
            this.turn = None;
            return Poll::Ready(None);
        }
        let end = (this.sent + FRAME_BYTES).min(this.data.len());
        let frame = this.data.slice(this.sent..end);
        this.sent = end;
        if this.sent == this.data.len() {
            this.turn = None;
        }
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.data.len()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact((self.data.len() - self.sent) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use tokio::sync::Semaphore;

    #[tokio::test]
    async fn the_turn_is_held_until_the_last_frame_is_taken() {
        let turns = Arc::new(Semaphore::new(1));
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut body = TurnHeldBody::new(data.clone(), Some(turns.clone().try_acquire_owned().unwrap()));
        assert_eq!(body.size_hint().exact(), Some(200_000));
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap().into_data().unwrap();
            assert!(frame.len() <= FRAME_BYTES);
            got.extend_from_slice(&frame);
            let left = got.len() < data.len();
            assert_eq!(turns.available_permits() == 0, left, "the turn is held while frames are left");
            assert_eq!(body.holds_turn(), left);
        }
        assert_eq!(got, data);
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_lets_the_turn_go() {
        let turns = Arc::new(Semaphore::new(1));
        let mut body = TurnHeldBody::new(vec![7u8; 1 << 20], Some(turns.clone().try_acquire_owned().unwrap()));
        body.frame().await.unwrap().unwrap();
        assert_eq!(turns.available_permits(), 0);
        drop(body);
        assert_eq!(turns.available_permits(), 1);
    }
}
