// The demo.Echo gRPC service and a client of it on grpc-go (Debian's 1.33, built in GOPATH
// mode), without generated code: a codec registered under the name "proto" passes messages
// through as raw bytes, so requests keep the content-type `application/grpc` of real services
// and the Python peers (raw bytes as well) interoperate. Messages are *[]byte.
//
//	echo server '<options JSON>'  prints "READY <port>", serves until killed
//	echo client '<spec JSON>'     runs the calls, prints one JSON result line per call
//
// The option, spec and result formats are those of the Python peers (echo_server.py,
// echo_client.py); tests/src/grpc.rs writes and reads them.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

func init() { encoding.RegisterCodec(rawCodec{}) }

func fatal(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 3 {
		fatal("usage: echo server|client|h2c '<json>'")
	}
	switch os.Args[1] {
	case "server":
		serve(os.Args[2])
	case "client":
		runClient(os.Args[2])
	case "h2c":
		serveH2c(os.Args[2])
	default:
		fatal("unknown role %q", os.Args[1])
	}
}

// ---- server ----

type serverOptions struct {
	EchoMetadata bool   `json:"echo_metadata"`
	Downstream   string `json:"downstream"` // "", "grpc://host:port" or "http://..."
	Log          string `json:"log"`        // one JSON line per finished RPC
}

var (
	options   serverOptions
	logMutex  sync.Mutex
	logFile   *os.File
	dialOnce  sync.Once
	dialConn  *grpc.ClientConn
	dialError error
)

// setUp reads the options, opens the request log and listens on a free loopback port.
func setUp(raw string) net.Listener {
	if err := json.Unmarshal([]byte(raw), &options); err != nil {
		fatal("options %q: %v", raw, err)
	}
	if options.Log != "" {
		f, err := os.OpenFile(options.Log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			fatal("open log: %v", err)
		}
		logFile = f
	}
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fatal("listen: %v", err)
	}
	return listener
}

func serve(raw string) {
	listener := setUp(raw)
	server := grpc.NewServer(grpc.UnaryInterceptor(recordUnary), grpc.StreamInterceptor(recordStream))
	server.RegisterService(&echoService, struct{}{})
	fmt.Printf("READY %d\n", listener.Addr().(*net.TCPAddr).Port)
	if err := server.Serve(listener); err != nil {
		fatal("serve: %v", err)
	}
}

// serveH2c runs a plain HTTP service (no gRPC) that speaks HTTP/1.1, h2c with prior knowledge
// and h2c after an HTTP/1.1 `Upgrade: h2c` (golang.org/x/net/http2/h2c). Every request gets 200
// "hello <path> over HTTP/<major>"; the log gets one line per request, as the gRPC server's.
func serveH2c(raw string) {
	listener := setUp(raw)
	hello := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintf(w, "hello %s over HTTP/%d\n", r.URL.Path, r.ProtoMajor)
		traceparents := r.Header.Values("traceparent")
		if traceparents == nil {
			traceparents = []string{}
		}
		line, _ := json.Marshal(map[string]interface{}{
			"method": r.Method + " " + r.URL.Path, "traceparent": traceparents, "peer": r.RemoteAddr, "code": 200,
			"protocol": r.Proto,
		})
		if logFile != nil {
			logMutex.Lock()
			logFile.Write(append(line, '\n'))
			logMutex.Unlock()
		}
	})
	server := &http.Server{Handler: h2c.NewHandler(hello, &http2.Server{})}
	fmt.Printf("READY %d\n", listener.Addr().(*net.TCPAddr).Port)
	if err := server.Serve(listener); err != nil {
		fatal("serve: %v", err)
	}
}

var echoService = grpc.ServiceDesc{
	ServiceName: "demo.Echo",
	HandlerType: (*interface{})(nil),
	Methods: []grpc.MethodDesc{
		{MethodName: "Unary", Handler: unaryHandler(unary)},
		{MethodName: "Fail", Handler: unaryHandler(fail)},
	},
	Streams: []grpc.StreamDesc{
		{StreamName: "ServerStream", Handler: serverStream, ServerStreams: true},
		{StreamName: "ClientStream", Handler: clientStream, ClientStreams: true},
		{StreamName: "BidiStream", Handler: bidiStream, ServerStreams: true, ClientStreams: true},
	},
}

func unaryHandler(handle func(context.Context, []byte) ([]byte, error)) func(interface{}, context.Context, func(interface{}) error, grpc.UnaryServerInterceptor) (interface{}, error) {
	return func(_ interface{}, ctx context.Context, decode func(interface{}) error, interceptor grpc.UnaryServerInterceptor) (interface{}, error) {
		var request []byte
		if err := decode(&request); err != nil {
			return nil, err
		}
		call := func(ctx context.Context, req interface{}) (interface{}, error) {
			reply, err := handle(ctx, *(req.(*[]byte)))
			if err != nil {
				return nil, err
			}
			return &reply, nil
		}
		return interceptor(ctx, &request, &grpc.UnaryServerInfo{}, call)
	}
}

func incoming(ctx context.Context, key string) []string {
	md, _ := metadata.FromIncomingContext(ctx)
	return md.Get(key)
}

// before runs what every RPC does first: the `delay-ms` metadata, and the echo of the
// traceparent values that arrived as trailing metadata.
func before(ctx context.Context) {
	if delay := incoming(ctx, "delay-ms"); len(delay) > 0 {
		if ms, err := strconv.Atoi(delay[0]); err == nil {
			time.Sleep(time.Duration(ms) * time.Millisecond)
		}
	}
	if options.EchoMetadata {
		pairs := []string{}
		for _, value := range incoming(ctx, "traceparent") {
			pairs = append(pairs, "echo-traceparent", value)
		}
		if len(pairs) > 0 {
			grpc.SetTrailer(ctx, metadata.Pairs(pairs...))
		}
	}
}

func record(ctx context.Context, method string, err error) {
	if logFile == nil {
		return
	}
	from := ""
	if p, ok := peer.FromContext(ctx); ok {
		from = p.Addr.String()
	}
	traceparents := incoming(ctx, "traceparent")
	if traceparents == nil {
		traceparents = []string{}
	}
	code := status.Code(err)
	// The client gave up first: what the server's handler saw is its context's end.
	if err == nil && ctx.Err() == context.DeadlineExceeded {
		code = codes.DeadlineExceeded
	} else if err == nil && ctx.Err() != nil {
		code = codes.Canceled
	}
	line, _ := json.Marshal(map[string]interface{}{
		"method": method, "traceparent": traceparents, "peer": from, "code": int(code),
	})
	logMutex.Lock()
	defer logMutex.Unlock()
	logFile.Write(append(line, '\n'))
}

func recordUnary(ctx context.Context, req interface{}, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (interface{}, error) {
	before(ctx)
	reply, err := handler(ctx, req)
	method, _ := grpc.Method(ctx)
	record(ctx, method, err)
	return reply, err
}

func recordStream(srv interface{}, stream grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	before(stream.Context())
	err := handler(srv, stream)
	record(stream.Context(), info.FullMethod, err)
	return err
}

func unary(ctx context.Context, request []byte) ([]byte, error) {
	if options.Downstream != "" {
		if err := callDownstream(ctx, request); err != nil {
			return nil, err
		}
	}
	return request, nil
}

// callDownstream calls the downstream service from the handler: demo.Echo/Unary with the same
// payload, or an HTTP GET. The connection is made by the first call, so that a process traced
// from its start sees it from its first byte.
func callDownstream(ctx context.Context, request []byte) error {
	target := options.Downstream
	if strings.HasPrefix(target, "http://") {
		response, err := http.Get(target)
		if err != nil {
			return status.Errorf(codes.Unavailable, "downstream: %v", err)
		}
		io.Copy(io.Discard, response.Body)
		response.Body.Close()
		if response.StatusCode/100 != 2 {
			return status.Errorf(codes.Unavailable, "downstream HTTP %d", response.StatusCode)
		}
		return nil
	}
	dialOnce.Do(func() {
		dialConn, dialError = grpc.Dial(strings.TrimPrefix(target, "grpc://"), grpc.WithInsecure())
	})
	if dialError != nil {
		return status.Errorf(codes.Unavailable, "downstream: %v", dialError)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var reply []byte
	if err := dialConn.Invoke(ctx, "/demo.Echo/Unary", &request, &reply); err != nil {
		s := status.Convert(err)
		return status.Errorf(s.Code(), "downstream: %s", s.Message())
	}
	return nil
}

// directives parses a request payload of the form `count=3&status=13`.
func directives(request []byte) url.Values {
	values, _ := url.ParseQuery(string(request))
	return values
}

func number(values url.Values, key string, fallback int) int {
	if n, err := strconv.Atoi(values.Get(key)); err == nil {
		return n
	}
	return fallback
}

// statusOf is the error for `status=N[&message=...]`, nil for OK.
func statusOf(values url.Values) error {
	code := number(values, "status", 0)
	if code == 0 {
		return nil
	}
	message := values.Get("message")
	if message == "" {
		message = fmt.Sprintf("failed with status %d", code)
	}
	return status.Error(codes.Code(code), message)
}

// fail: `status=N[&message=...][&sleep_ms=M]`: that status, before any message (a
// trailers-only response), or an empty reply for status 0.
func fail(ctx context.Context, request []byte) ([]byte, error) {
	values := directives(request)
	time.Sleep(time.Duration(number(values, "sleep_ms", 0)) * time.Millisecond)
	if err := statusOf(values); err != nil {
		return nil, err
	}
	return []byte{}, nil
}

// serverStream: `count=N[&status=S]`: N replies "reply <i>", then status S.
func serverStream(_ interface{}, stream grpc.ServerStream) error {
	var request []byte
	if err := stream.RecvMsg(&request); err != nil {
		return err
	}
	values := directives(request)
	for i := 0; i < number(values, "count", 1); i++ {
		reply := []byte(fmt.Sprintf("reply %d", i))
		if err := stream.SendMsg(&reply); err != nil {
			return err
		}
	}
	return statusOf(values)
}

// clientStream: reads every request, then one reply `{"messages": n, "bytes": m}`.
func clientStream(_ interface{}, stream grpc.ServerStream) error {
	messages, bytes := 0, 0
	for {
		var request []byte
		err := stream.RecvMsg(&request)
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		messages++
		bytes += len(request)
	}
	reply := []byte(fmt.Sprintf(`{"messages": %d, "bytes": %d}`, messages, bytes))
	return stream.SendMsg(&reply)
}

// bidiStream echoes each request as it arrives.
func bidiStream(_ interface{}, stream grpc.ServerStream) error {
	for {
		var request []byte
		err := stream.RecvMsg(&request)
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := stream.SendMsg(&request); err != nil {
			return err
		}
	}
}

// ---- client ----

type payload struct {
	Text *string `json:"text"`
	Size *int    `json:"size"`
}

func (p payload) bytes() []byte {
	if p.Text != nil {
		return []byte(*p.Text)
	}
	filler := make([]byte, *p.Size)
	for i := range filler {
		filler[i] = byte('a' + i%26)
	}
	return filler
}

type call struct {
	Service   string      `json:"service"`
	Method    string      `json:"method"`
	Kind      string      `json:"kind"` // unary, server_stream, client_stream, bidi
	Messages  []payload   `json:"messages"`
	Metadata  [][2]string `json:"metadata"`
	TimeoutMs *int        `json:"timeout_ms"`
}

type spec struct {
	Target     string `json:"target"`
	Concurrent bool   `json:"concurrent"`
	Calls      []call `json:"calls"`
}

type result struct {
	Call            int      `json:"call"`
	Code            int      `json:"code"`
	Details         string   `json:"details"`
	Replies         int      `json:"replies"`
	ReplyBytes      int      `json:"reply_bytes"`
	Echoed          bool     `json:"echoed"`
	FirstReply      *string  `json:"first_reply"`
	EchoTraceparent []string `json:"echo_traceparent"`
	ElapsedMs       float64  `json:"elapsed_ms"`
}

var printMutex sync.Mutex

func runClient(raw string) {
	var s spec
	if err := json.Unmarshal([]byte(raw), &s); err != nil {
		fatal("spec %q: %v", raw, err)
	}
	conn, err := grpc.Dial(s.Target, grpc.WithInsecure())
	if err != nil {
		fatal("dial %s: %v", s.Target, err)
	}
	defer conn.Close()
	if !s.Concurrent {
		for i, c := range s.Calls {
			printResult(doCall(conn, i, c))
		}
		return
	}
	// Every call waits at the gate, so that they all run at once on the one connection.
	gate := make(chan struct{})
	var wg sync.WaitGroup
	for i, c := range s.Calls {
		wg.Add(1)
		go func(i int, c call) {
			defer wg.Done()
			<-gate
			printResult(doCall(conn, i, c))
		}(i, c)
	}
	close(gate)
	wg.Wait()
}

func printResult(r result) {
	line, _ := json.Marshal(r)
	printMutex.Lock()
	defer printMutex.Unlock()
	fmt.Println(string(line))
}

func doCall(conn *grpc.ClientConn, index int, c call) result {
	ctx := context.Background()
	if c.TimeoutMs != nil {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(*c.TimeoutMs)*time.Millisecond)
		defer cancel()
	}
	for _, kv := range c.Metadata {
		ctx = metadata.AppendToOutgoingContext(ctx, kv[0], kv[1])
	}
	var sent, received []byte
	var replies [][]byte
	var trailer metadata.MD
	start := time.Now()
	method := "/" + c.Service + "/" + c.Method
	var err error
	if c.Kind == "unary" {
		request := c.Messages[0].bytes()
		sent = request
		var reply []byte
		err = conn.Invoke(ctx, method, &request, &reply, grpc.Trailer(&trailer))
		if err == nil {
			replies = append(replies, reply)
		}
	} else {
		desc := &grpc.StreamDesc{
			ServerStreams: c.Kind == "server_stream" || c.Kind == "bidi",
			ClientStreams: c.Kind == "client_stream" || c.Kind == "bidi",
		}
		var stream grpc.ClientStream
		stream, err = conn.NewStream(ctx, desc, method)
		if err == nil {
			sent, replies, err = converse(stream, c)
			trailer = stream.Trailer()
		}
	}
	elapsed := time.Since(start)
	for _, reply := range replies {
		received = append(received, reply...)
	}
	s := status.Convert(err)
	r := result{
		Call: index, Code: int(s.Code()), Details: s.Message(), Replies: len(replies),
		ReplyBytes: len(received), Echoed: string(sent) == string(received),
		EchoTraceparent: trailer.Get("echo-traceparent"),
		ElapsedMs:       float64(elapsed.Microseconds()) / 1000,
	}
	if r.EchoTraceparent == nil {
		r.EchoTraceparent = []string{}
	}
	if len(replies) > 0 && len(replies[0]) < 1024 && utf8.Valid(replies[0]) {
		text := string(replies[0])
		r.FirstReply = &text
	}
	return r
}

// converse runs a streaming call: the requests (a bidi call waits for each echo before the
// next request), then every reply until the status. Returns what was sent and received.
func converse(stream grpc.ClientStream, c call) ([]byte, [][]byte, error) {
	var sent []byte
	var replies [][]byte
	for _, message := range c.Messages {
		request := message.bytes()
		sent = append(sent, request...)
		if err := stream.SendMsg(&request); err != nil {
			break // the status comes from RecvMsg
		}
		if c.Kind == "bidi" {
			var reply []byte
			if err := stream.RecvMsg(&reply); err != nil {
				return sent, replies, normalize(err)
			}
			replies = append(replies, reply)
		}
	}
	if err := stream.CloseSend(); err != nil {
		return sent, replies, err
	}
	for {
		var reply []byte
		if err := stream.RecvMsg(&reply); err != nil {
			return sent, replies, normalize(err)
		}
		replies = append(replies, reply)
		if c.Kind == "client_stream" || c.Kind == "unary" {
			// Not server-streaming: RecvMsg already read the status after the one reply.
			return sent, replies, nil
		}
	}
}

func normalize(err error) error {
	if err == io.EOF {
		return nil
	}
	return err
}
