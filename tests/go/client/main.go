// A Go client of gptoss.v1, built from Debian's Go packages only (tests/go/build.sh): it streams a
// Chat, streams and cancels a Generate, and reads the field violations of an INVALID_ARGUMENT.
// It prints one JSON report of what it saw, for tests/go/test_go_client.py.
//
// Usage: gptoss-client HOST:PORT
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	gptossv1 "github.com/gptoss-cluster/gptoss-cluster/gen/go/gptoss/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

type chatReport struct {
	RequestID        string   `json:"request_id"`
	Deltas           int      `json:"deltas"`
	Raw              int      `json:"raw"`
	Channels         []string `json:"channels"`
	Text             string   `json:"text"`
	FinishReason     string   `json:"finish_reason"`
	PromptTokens     uint32   `json:"prompt_tokens"`
	CompletionTokens uint32   `json:"completion_tokens"`
}

type cancelReport struct {
	Chunks int    `json:"chunks"`
	Code   string `json:"code"`
}

type violation struct {
	Field       string `json:"field"`
	Description string `json:"description"`
}

type invalidReport struct {
	Code       string      `json:"code"`
	Violations []violation `json:"violations"`
}

// chat streams one Chat and collects its deltas and the closing ChatComplete.
func chat(client gptossv1.InferenceClient) (chatReport, error) {
	report := chatReport{Channels: []string{}}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// Add "authorization", "Bearer <key>" here when the server has API keys.
	ctx = metadata.AppendToOutgoingContext(ctx, "x-request-id", "go-chat-1")
	maxTokens := int32(16)
	stream, err := client.Chat(ctx, &gptossv1.ChatRequest{
		Messages:        []*gptossv1.ChatMessage{{Role: gptossv1.Role_ROLE_USER, Content: "Why is the sky blue?"}},
		ReasoningEffort: gptossv1.ReasoningEffort_REASONING_EFFORT_LOW,
		Sampling:        &gptossv1.SamplingParams{MaxTokens: &maxTokens},
	})
	if err != nil {
		return report, err
	}
	header, err := stream.Header()
	if err != nil {
		return report, err
	}
	if ids := header.Get("x-request-id"); len(ids) > 0 {
		report.RequestID = ids[0]
	}
	for {
		response, err := stream.Recv()
		if err != nil {
			return report, err // the stream ended without ChatComplete: its status says why
		}
		if delta := response.GetDelta(); delta != nil {
			report.Deltas++
			if delta.Raw {
				report.Raw++
			}
			channel := delta.Channel.String()
			if !contains(report.Channels, channel) {
				report.Channels = append(report.Channels, channel)
			}
			report.Text += delta.Text
		} else if complete := response.GetComplete(); complete != nil {
			report.FinishReason = complete.FinishReason.String()
			report.PromptTokens = complete.Usage.GetPromptTokens()
			report.CompletionTokens = complete.Usage.GetCompletionTokens()
			return report, nil
		}
	}
}

// cancelMidway starts a long Generate and cancels it after two chunks; the server stops generating.
func cancelMidway(client gptossv1.InferenceClient) (cancelReport, error) {
	report := cancelReport{}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	maxTokens := int32(3000)
	stream, err := client.Generate(ctx, &gptossv1.GenerateRequest{
		PromptTokenIds: []uint32{1, 2, 3},
		Sampling:       &gptossv1.SamplingParams{MaxTokens: &maxTokens, IgnoreStop: true},
	})
	if err != nil {
		return report, err
	}
	for {
		_, err := stream.Recv()
		if err != nil {
			report.Code = status.Code(err).String()
			return report, nil
		}
		report.Chunks++
		if report.Chunks == 2 {
			cancel()
		}
	}
}

// invalid sends a Generate without a prompt and reads the google.rpc.BadRequest in its status.
func invalid(client gptossv1.InferenceClient) (invalidReport, error) {
	report := invalidReport{Violations: []violation{}}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	stream, err := client.Generate(ctx, &gptossv1.GenerateRequest{})
	if err == nil {
		_, err = stream.Recv() // a server stream's status arrives with the first Recv
	}
	if err == nil {
		return report, fmt.Errorf("an empty GenerateRequest was accepted")
	}
	st := status.Convert(err)
	report.Code = st.Code().String()
	for _, detail := range st.Details() {
		if badRequest, ok := detail.(*errdetails.BadRequest); ok {
			for _, v := range badRequest.GetFieldViolations() {
				report.Violations = append(report.Violations, violation{v.GetField(), v.GetDescription()})
			}
		}
	}
	return report, nil
}

func contains(values []string, value string) bool {
	for _, v := range values {
		if v == value {
			return true
		}
	}
	return false
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: gptoss-client HOST:PORT")
		os.Exit(2)
	}
	// grpc.WithTransportCredentials(credentials.NewClientTLSFromCert(nil, "")) when the server has TLS.
	conn, err := grpc.Dial(os.Args[1], grpc.WithInsecure())
	if err != nil {
		fail("dial", err)
	}
	defer conn.Close()
	client := gptossv1.NewInferenceClient(conn)

	chatSeen, err := chat(client)
	if err != nil {
		fail("chat", err)
	}
	cancelSeen, err := cancelMidway(client)
	if err != nil {
		fail("cancel", err)
	}
	invalidSeen, err := invalid(client)
	if err != nil {
		fail("invalid", err)
	}
	out, _ := json.Marshal(map[string]interface{}{"chat": chatSeen, "cancel": cancelSeen, "invalid": invalidSeen})
	fmt.Println(string(out))
}

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", what, err)
	os.Exit(1)
}
