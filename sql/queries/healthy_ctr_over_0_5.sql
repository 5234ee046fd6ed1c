-- Images the text calls healthy whose measured CTR exceeds 0.5: candidates for review
-- (a wrong mask, an AP film, or a report that missed an enlarged heart).
SELECT uid, model, ROUND(ctr, 3) AS ctr, ROUND(quality, 3) AS quality, view, age, sex
FROM label_results
WHERE group_name = 'healthy' AND ctr > 0.5
ORDER BY ctr DESC;
