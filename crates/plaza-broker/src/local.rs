//! The single-node broker: a publication goes straight to this node's sink.

use std::sync::Arc;

use plaza_core::{ConnId, Publication};

use crate::{BoxFuture, Broker, BrokerError, PublicationSink};

pub struct LocalBroker {
    sink: Arc<dyn PublicationSink>,
}

impl LocalBroker {
    pub fn new(sink: Arc<dyn PublicationSink>) -> Self {
        Self { sink }
    }
}

impl Broker for LocalBroker {
    fn name(&self) -> &'static str {
        "local"
    }

    fn publish(&self, publication: Publication) -> BoxFuture<'_, Result<(), BrokerError>> {
        // Delivering before returning keeps per-publisher order without any queue: the node's
        // sink only pushes frames into connection queues.
        self.sink.deliver(&publication);
        Box::pin(std::future::ready(Ok(())))
    }

    fn subscribe(&self, _channel: Arc<str>) -> BoxFuture<'_, Result<(), BrokerError>> {
        // One node: every local subscriber already receives every local publication.
        Box::pin(std::future::ready(Ok(())))
    }

    fn unsubscribe(&self, _channel: Arc<str>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn publish_event(
        &self,
        channel: Arc<str>,
        except: ConnId,
        frame: String,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.sink.event(&channel, except, &frame);
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plaza_core::{ChannelName, Payload};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl PublicationSink for Recorder {
        fn deliver(&self, p: &Publication) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{}={}", p.channel, p.data.as_str()));
        }
        fn event(&self, _: &str, _: ConnId, _: &str) {}
        fn interested(&self, _: &str) -> bool {
            true
        }
        fn gap(&self, _: &str, _: Option<&plaza_core::Position>, _: bool) {}
    }

    #[test]
    fn publish_reaches_the_sink_in_order() {
        let rec = Arc::new(Recorder::default());
        let broker = LocalBroker::new(rec.clone());
        for i in 0..3 {
            let p = Publication {
                channel: ChannelName::parse("a", 10).unwrap(),
                data: Payload::from_json_text(i.to_string()).unwrap(),
                position: None,
            };
            // The future is already complete; poll it without a runtime.
            let fut = broker.publish(p);
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            let mut fut = fut;
            assert!(matches!(
                fut.as_mut().poll(&mut cx),
                std::task::Poll::Ready(Ok(()))
            ));
        }
        assert_eq!(*rec.0.lock().unwrap(), vec!["a=0", "a=1", "a=2"]);
    }
}
