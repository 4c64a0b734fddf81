// A reference SSE client that nobody here wrote: the npm `eventsource`
// package (a WHATWG EventSource for Node). It prints one JSON line per
// event, so the Rust test can check what a standard client makes of the
// stream, including its own reconnects with Last-Event-ID.
//
// usage: node e2e/js/eventsource-client.mjs <url>
import { EventSource } from 'eventsource';

const url = process.argv[2];
const source = new EventSource(url);
const print = (value) => process.stdout.write(JSON.stringify(value) + '\n');

source.onopen = () => print({ open: true });
source.onmessage = (event) => {
  let data;
  try {
    data = JSON.parse(event.data);
  } catch {
    data = event.data;
  }
  print({ lastEventId: event.lastEventId, data });
};
source.onerror = (error) => print({ error: String(error?.message ?? error) });
